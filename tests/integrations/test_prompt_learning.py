"""fastft.patch on peft prompt-learning models (prompt tuning, P-tuning, prefix tuning with and without its
projection MLP) of a mini Llama, fp32 or 4-bit base, with the fused loss: the same losses and gradients as plain
peft; the prefix computed once per step; prefix tuning under gradient checkpointing; clear errors."""

import copy

import pytest
import torch
from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, OpenAIGPTConfig, OpenAIGPTLMHeadModel

import fastft

VOCAB = 256
CONFIGS = {
    "prompt": lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5),
    "p-tuning": lambda: PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, encoder_hidden_size=32),
    "prefix": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5),
    "prefix+mlp": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, prefix_projection=True,
                                             encoder_hidden_size=32),
}


def base(quantized=False):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=40))
    return fastft.quantize_model(model) if quantized else model


def peft_model(kind, quantized=False):
    torch.manual_seed(1)
    model = get_peft_model(base(quantized), CONFIGS[kind]())
    if kind != "prompt":  # a trained-looking prompt encoder, not its zero/identity init
        with torch.no_grad():
            for p in model.prompt_encoder.parameters():
                p.normal_(0, 0.5)
    return model.train()


def batch(seed=0):
    ids = torch.randint(0, VOCAB, (3, 11), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # a left-padded row
    labels = ids.masked_fill(mask == 0, -100)
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def loss_and_grads(model, seed=0):
    model.zero_grad()
    loss = model(**batch(seed)).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_close(a, b, rtol=1e-5):
    assert torch.isfinite(a).all()
    assert (a - b).norm() <= rtol * b.norm(), ((a - b).norm(), b.norm())


@pytest.mark.parametrize("kind, quantized", [(kind, True) for kind in CONFIGS] + [("prefix+mlp", False)],
                         ids=lambda v: v if isinstance(v, str) else ("nf4" if v else "fp32"))
def test_same_loss_and_gradients_as_peft(kind, quantized):
    reference = peft_model(kind, quantized)
    ours = copy.deepcopy(reference)
    report = fastft.patch(ours, fused_loss=True)
    assert report.fused["prompt learning (peft)"] == 1 and report.fused["causal LM loss (fused linear cross-entropy)"]
    for seed in range(2):
        loss, grads = loss_and_grads(ours, seed)
        ref_loss, ref_grads = loss_and_grads(reference, seed)
        assert_close(loss, ref_loss)
        assert grads.keys() == ref_grads.keys() and grads
        for name in grads:
            assert_close(grads[name], ref_grads[name])


@pytest.mark.parametrize("kind", ["prefix", "prefix+mlp"])
def test_prefix_encoder_runs_once_per_step(kind):
    rows = []
    for patched in (False, True):
        model = peft_model(kind)
        if patched:
            fastft.patch(model)
        model.prompt_encoder.default.embedding.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0]))
        model(**batch())
    assert rows == [3, 1]  # peft: one row per batch row; fastft: one


@pytest.mark.parametrize("kind", ["prefix", "prefix+mlp"])
def test_prefix_tuning_under_gradient_checkpointing(kind):
    model = peft_model(kind)
    fastft.patch(model, fused_loss=True)
    loss, grads = loss_and_grads(model)
    model.get_base_model().gradient_checkpointing_enable()
    checkpointed_loss, checkpointed_grads = loss_and_grads(model)
    assert_close(checkpointed_loss, loss)
    for name in grads:
        assert_close(checkpointed_grads[name], grads[name])
    # plain peft under checkpointing: transformers drops past_key_values, the prefix-sized mask no longer fits
    plain = peft_model(kind)
    plain.get_base_model().gradient_checkpointing_enable()
    with pytest.raises(RuntimeError, match="size of tensor"):
        plain(**batch())


def test_reentrant_checkpointing_is_refused():
    model = peft_model("prefix")
    fastft.patch(model)
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(ValueError, match="use_reentrant"):
        model(**batch())


def test_eval_mode_and_generation_keep_peft_path():
    model = peft_model("prefix")
    reference = copy.deepcopy(model).eval()
    fastft.patch(model)
    model.eval()
    ids = batch()["input_ids"]
    assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    generated = model.generate(input_ids=ids[:1], max_new_tokens=3, do_sample=False)
    assert torch.equal(generated, reference.generate(input_ids=ids[:1], max_new_tokens=3, do_sample=False))


def test_input_longer_than_the_context():
    model = peft_model("prompt")
    fastft.patch(model)
    ids = torch.zeros(1, 36, dtype=torch.long)  # 36 + 5 virtual tokens > 40
    with pytest.raises(ValueError, match="num_virtual_tokens \\(5\\) \\+ the input's 36 tokens exceed"):
        model(input_ids=ids, labels=ids)


def test_prefix_longer_than_the_context():
    model = get_peft_model(base(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=40))
    with pytest.raises(ValueError, match="num_virtual_tokens \\(40\\).*max_position_embeddings=40"):
        fastft.patch(model)


def test_prefix_on_a_model_without_past_key_values():
    torch.manual_seed(0)
    gpt = OpenAIGPTLMHeadModel(OpenAIGPTConfig(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=32))
    model = get_peft_model(gpt, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    with pytest.raises(ValueError, match="OpenAIGPTLMHeadModel.forward does not"):
        fastft.patch(model)
