"""fastft.methods.freeze on mini transformers models: what trains, the same loss and gradients as plain
transformers with the same parameters frozen (fp32 base, and a 4-bit frozen part vs its dequantized weights), no
activation saved below the lowest trainable layer, the fused loss on top, save/load, bad input."""

import copy

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import fastft
from fastft.bench.harness import saved_for_backward_bytes
from fastft.methods.freeze import freeze
from fastft.nn import NF4Linear

VOCAB = 256


def llama(layers=4, tied=True):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=64, tie_word_embeddings=tied)).train()


def ids(seed=0, shape=(2, 13)):
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def plain_copy(model, trainable_names):
    """The plain transformers peer: an unpatched copy with an untied head and only `trainable_names` trainable."""
    plain = copy.deepcopy(model)
    fastft.unpatch(plain)  # gives the no_grad layers their transformers class back
    for name, param in plain.named_parameters():
        param.requires_grad_(name in trainable_names)
    return plain


def assert_close(a, b, rtol=1e-5):
    assert torch.isfinite(a).all()
    assert (a - b).norm() <= rtol * b.norm().clamp_min(1e-12), ((a - b).norm(), b.norm())


def train_losses(model, steps=5):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for step in range(steps):
        loss = model(input_ids=ids(step), labels=ids(step)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return torch.tensor(losses)


def test_top_k_trains_the_top_layers_norm_and_untied_head():
    model = llama()
    report = freeze(model, top_k=2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.startswith(("model.layers.2.", "model.layers.3.", "model.norm.", "lm_head.")) for n in trainable)
    assert "lm_head.weight" in trainable and "model.norm.weight" in trainable
    assert any(n.startswith("model.layers.2.") for n in trainable)
    assert model.lm_head.weight is not model.model.embed_tokens.weight and not model.config.tie_word_embeddings
    assert report.untied_head and report.trainable_layers == [2, 3]
    assert report.no_grad_modules == ["model.embed_tokens", "model.layers.0", "model.layers.1"]
    assert report.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert "2, 3" in str(report) and "lm_head" in str(report)


@pytest.mark.parametrize("fused_loss", [False, True])
def test_same_loss_and_gradients_as_plain_transformers(fused_loss):
    model = llama()
    freeze(model, top_k=1)
    plain = plain_copy(model, {n for n, p in model.named_parameters() if p.requires_grad})
    if fused_loss:
        fastft.patch(model, fused_loss=True)
    for m in (model, plain):
        m(input_ids=ids(), labels=ids()).loss.backward()
    grads = dict(plain.named_parameters())
    for name, param in model.named_parameters():
        assert (param.grad is None) == (grads[name].grad is None), name
        if param.grad is not None:
            assert_close(param.grad, grads[name].grad)
    model.zero_grad(), plain.zero_grad()
    assert_close(train_losses(model), train_losses(plain))


def test_4bit_frozen_part_matches_plain_transformers_on_the_dequantized_weights():
    model = llama()
    report = freeze(model, top_k=1, quantize=True)
    assert report.quantized_linears == 3 * 7
    assert all(isinstance(model.model.layers[i].mlp.up_proj, NF4Linear) for i in range(3))
    assert type(model.model.layers[3].mlp.up_proj) is nn.Linear
    plain = llama()
    plain.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    plain.config.tie_word_embeddings = False
    for name, module in model.named_modules():
        if isinstance(module, NF4Linear):
            plain.get_submodule(name).weight.data = module.to_linear().weight.detach().clone()
    plain.load_state_dict({n: p for n, p in model.state_dict().items() if n in plain.state_dict()
                           and model.state_dict()[n].shape == plain.state_dict()[n].shape}, strict=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for name, param in plain.named_parameters():
        param.requires_grad_(name in trainable)
    for m in (model, plain):
        m(input_ids=ids(), labels=ids()).loss.backward()
    grads = dict(plain.named_parameters())
    for name in trainable:
        assert_close(dict(model.named_parameters())[name].grad, grads[name].grad)
    model.zero_grad(), plain.zero_grad()
    assert_close(train_losses(model), train_losses(plain))


def test_nothing_saved_for_backward_below_the_lowest_trainable_layer():
    """With the embedding output requiring grad (as transformers' enable_input_require_grads makes it), plain
    transformers saves the activations of every frozen layer; freeze saves only those of the trained top layer, as
    much as a model whose frozen bottom cannot need a gradient at all."""
    def saved(model):
        params = list(model.parameters())
        return saved_for_backward_bytes(lambda: model(input_ids=ids(), labels=ids()).loss, exclude=params)

    frozen = llama(layers=4, tied=False)
    freeze(frozen, top_k=1)
    minimal = plain_copy(frozen, {n for n, p in frozen.named_parameters() if p.requires_grad})
    plain = plain_copy(frozen, {n for n, p in frozen.named_parameters() if p.requires_grad})
    frozen.enable_input_require_grads()
    plain.enable_input_require_grads()
    assert saved(frozen) == saved(minimal)
    assert saved(plain) > 2 * saved(minimal)  # three more layers of activations


def test_patterns_and_head_only():
    model = llama()
    report = freeze(model, patterns=["*.mlp.*"], head=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".mlp." in n for n in trainable) and not report.untied_head
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert report.no_grad_modules == ["model.embed_tokens"]
    model = llama()
    report = freeze(model)  # the head (and final norm) only: every layer runs without grad
    assert report.trainable_layers == [] and len(report.no_grad_modules) == 5
    model(input_ids=ids(), labels=ids()).loss.backward()
    assert model.lm_head.weight.grad is not None


def test_trained_embedding_keeps_every_layer_on_autograd():
    model = llama()
    report = freeze(model, top_k=1, patterns=["model.embed_tokens.*"])
    assert report.no_grad_modules == []
    model(input_ids=ids(), labels=ids()).loss.backward()
    assert model.model.embed_tokens.weight.grad is not None


def test_gpt2_top_layer():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=3, n_head=4, n_positions=64))
    report = freeze(model, top_k=1)
    assert report.trainable_layers == [2]
    assert report.no_grad_modules == ["transformer.wte", "transformer.wpe", "transformer.h.0", "transformer.h.1"]
    assert "transformer.ln_f" in report.trainable_other


def test_save_and_load_keeps_the_untied_head(tmp_path):
    model = llama()
    freeze(model, top_k=1)
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    model.save_pretrained(tmp_path)
    loaded = LlamaForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)


@pytest.mark.parametrize("kwargs, match", [
    (dict(top_k=0), "top_k must be an int in \\[1, 4\\]"),
    (dict(top_k=5), "top_k must be an int"),
    (dict(top_k=True), "top_k must be an int"),
    (dict(patterns=["*.nope.*"]), "match no parameter name"),
    (dict(head=False), "nothing to train"),
])
def test_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        freeze(llama(), **kwargs)
