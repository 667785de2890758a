"""fastft.losses.fused_linear_cross_entropy vs F.cross_entropy on materialized logits, and
fastft.patch(fused_loss=True) on real transformers causal LMs (with and without peft, and under HF Trainer)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

import fastft
from conftest import causal_lm_losses, rel_error
from fastft.bench.harness import saved_for_backward_bytes
from fastft.losses import fused_linear_cross_entropy
from fastft.ops import logprobs as ops

VOCAB = 300


def cross_entropy_inputs(dtype, bias=True, vocab=VOCAB, tokens=(3, 41), hidden_size=24):
    g = torch.Generator().manual_seed(vocab + tokens[1])
    hidden = torch.randn(*tokens, hidden_size, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, generator=g) * 0.3).to(dtype).requires_grad_()
    b = torch.randn(vocab, generator=g).to(dtype).requires_grad_() if bias else None
    labels = torch.randint(0, vocab, tokens, generator=g)
    labels[0, :7] = -100
    return hidden, weight, b, labels


def reference(hidden, weight, bias, labels, reduction="mean", num_items_in_batch=None):
    logits = F.linear(hidden.double(), weight.double(), None if bias is None else bias.double())
    loss = F.cross_entropy(logits.reshape(-1, weight.shape[0]), labels.reshape(-1),
                           reduction="sum" if num_items_in_batch is not None else reduction)
    if num_items_in_batch is not None:
        return loss / num_items_in_batch
    return loss.reshape(labels.shape) if reduction == "none" else loss


@pytest.mark.parametrize("reduction", ("mean", "sum", "none"))
@pytest.mark.parametrize("bias", (True, False))
def test_matches_cross_entropy_fp64(reduction, bias):
    hidden, weight, b, labels = cross_entropy_inputs(torch.float64, bias)
    leaves = [t for t in (hidden, weight, b) if t is not None]
    ours = fused_linear_cross_entropy(hidden, weight, labels, bias=b, reduction=reduction)
    expected = reference(hidden, weight, b, labels, reduction)
    grad = torch.randn_like(expected)
    assert ours.shape == expected.shape and ours.dtype == torch.float64
    assert rel_error(ours, expected) < 1e-12
    for a, e in zip(torch.autograd.grad(ours, leaves, grad), torch.autograd.grad(expected, leaves, grad)):
        assert rel_error(a, e) < 1e-12


@pytest.mark.parametrize("dtype, tolerance", ((torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)))
def test_lower_precision_and_many_chunks(dtype, tolerance, monkeypatch):
    monkeypatch.setattr(ops, "_TILE_BYTES", 40 * VOCAB * 4)  # 40-token chunks: the 123 tokens take four
    hidden, weight, b, labels = cross_entropy_inputs(dtype)
    ours = fused_linear_cross_entropy(hidden, weight, labels, bias=b)
    expected = reference(hidden, weight, b, labels)
    assert ours.dtype == torch.float32 and rel_error(ours, expected) < tolerance
    ours_grads = torch.autograd.grad(ours, [hidden, weight, b])
    for a, e, leaf in zip(ours_grads, torch.autograd.grad(expected, [hidden, weight, b]), (hidden, weight, b)):
        assert a.dtype == leaf.dtype and rel_error(a, e) < 2 * tolerance


def test_num_items_in_batch_frozen_head_and_gradcheck():
    hidden, weight, _, labels = cross_entropy_inputs(torch.float64, bias=False)
    weight.requires_grad_(False)
    ours = fused_linear_cross_entropy(hidden, weight, labels, num_items_in_batch=17)
    assert rel_error(ours, reference(hidden, weight, None, labels, num_items_in_batch=17)) < 1e-12
    small = [t[:, :5].detach().requires_grad_() for t in (hidden,)] + [weight[:11].detach().requires_grad_()]
    small_labels = labels[:, :5] % 11
    assert torch.autograd.gradcheck(lambda h, w: fused_linear_cross_entropy(h, w, small_labels), small)


def test_bad_inputs():
    hidden, weight, b, labels = cross_entropy_inputs(torch.float32)
    with pytest.raises(ValueError, match=r"weight must be \(vocab, 24\)"):
        fused_linear_cross_entropy(hidden, weight[:, :5], labels)
    with pytest.raises(ValueError, match="labels must be integer with shape"):
        fused_linear_cross_entropy(hidden, weight, labels.float())
    with pytest.raises(ValueError, match="bias must have shape"):
        fused_linear_cross_entropy(hidden, weight, labels, bias=b[:3])
    with pytest.raises(ValueError, match="reduction must be one of"):
        fused_linear_cross_entropy(hidden, weight, labels, reduction="max")
    with pytest.raises(TypeError, match="hidden must be a floating tensor"):
        fused_linear_cross_entropy(labels, weight, labels)
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        fused_linear_cross_entropy(hidden, weight, labels, ignore_index=None)


@pytest.mark.parametrize("reduction", ("mean", "sum", "none"))
@pytest.mark.parametrize("bad", (VOCAB, VOCAB + 7, -1, -5))
def test_labels_outside_the_vocabulary_are_named(reduction, bad):
    hidden, weight, b, labels = cross_entropy_inputs(torch.float32)
    labels = labels.clone()
    labels[2, 3] = bad
    with pytest.raises(ValueError, match=rf"labels must be in \[0, {VOCAB}\).*ignore_index=-100, got {bad} at flat "
                                         rf"index 85"):
        fused_linear_cross_entropy(hidden, weight, labels, bias=b, reduction=reduction)
    labels[2, 3] = 0  # labels equal to another ignore_index are skipped, -100 is then out of range
    with pytest.raises(ValueError, match=r"labels .*ignore_index=-1, got -100 at flat index 0"):
        fused_linear_cross_entropy(hidden, weight, labels, ignore_index=-1)
    expected = fused_linear_cross_entropy(hidden, weight, labels, bias=b, reduction=reduction)
    ours = fused_linear_cross_entropy(hidden, weight, labels.masked_fill(labels == -100, -1), bias=b,
                                      reduction=reduction, ignore_index=-1)
    assert torch.equal(ours, expected)


@pytest.mark.parametrize("num_items", (0, -3, float("nan"), float("inf"), torch.tensor(0), torch.tensor(-1.0),
                                       torch.tensor(float("inf"))))
def test_num_items_in_batch_must_be_positive(num_items):
    hidden, weight, b, labels = cross_entropy_inputs(torch.float32)
    with pytest.raises(ValueError, match=r"num_items_in_batch must be a finite number > 0"):
        fused_linear_cross_entropy(hidden, weight, labels, num_items_in_batch=num_items)
    for bad_type in (True, torch.tensor([3, 4])):
        with pytest.raises(TypeError, match="num_items_in_batch must be"):
            fused_linear_cross_entropy(hidden, weight, labels, num_items_in_batch=bad_type)


def test_no_counted_token_gives_zero_not_nan():
    """Without num_items_in_batch, a batch whose labels are all ignore_index has no token to average over: the
    mean is 0 (the sum over no token), with zero gradients."""
    hidden, weight, b, labels = cross_entropy_inputs(torch.float64)
    loss = fused_linear_cross_entropy(hidden, weight, torch.full_like(labels, -100), bias=b)
    loss.backward()
    assert loss.item() == 0.0 and not hidden.grad.any()


@pytest.mark.slow
def test_label_and_num_items_checks_run_in_compiled_graphs():
    """The values are checked inside the op, which runs with the real tensors in a fullgraph-compiled function."""
    hidden, weight, b, labels = cross_entropy_inputs(torch.float32)
    compiled = torch.compile(lambda h, w, l, n: fused_linear_cross_entropy(h, w, l, num_items_in_batch=n),
                             backend="aot_eager", fullgraph=True)
    expected = fused_linear_cross_entropy(hidden, weight, labels, num_items_in_batch=torch.tensor(50))
    assert rel_error(compiled(hidden, weight, labels, torch.tensor(50)), expected) < 1e-6
    bad = labels.clone()
    bad[1, 1] = VOCAB
    with pytest.raises(ValueError, match=rf"labels must be in \[0, {VOCAB}\).*got {VOCAB}"):
        compiled(hidden, weight, bad, torch.tensor(50))
    with pytest.raises(ValueError, match="num_items_in_batch must be a finite number > 0"):
        compiled(hidden, weight, labels, torch.tensor(0))


def causal_lm(kind):
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
               "qwen2": (Qwen2Config, Qwen2ForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}
    config_class, model_class = classes[kind]
    return model_class(config_class(**common))


def batch(step):
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(step))
    return ids


@pytest.mark.parametrize("kind", ("llama", "mistral", "qwen2", "qwen3"))
def test_full_fine_tuning_losses_and_weights_match(kind):
    """Every weight trains, lm_head included: the same gradients as transformers' own loss, then the same losses
    over 8 AdamW steps."""
    reference_model = causal_lm(kind)
    patched = copy.deepcopy(reference_model)
    report = fastft.patch(patched, fused_loss=True)
    assert report.fused["causal LM loss (fused linear cross-entropy)"] == 1
    ids = batch(100)
    for model in (reference_model, patched):
        model(input_ids=ids, labels=ids).loss.backward()
    theirs = dict(reference_model.named_parameters())
    for name, param in patched.named_parameters():
        assert rel_error(param.grad, theirs[name].grad) < 1e-5, name
        param.grad = theirs[name].grad = None
    expected = causal_lm_losses(reference_model, batch, 8)
    assert causal_lm_losses(patched, batch, 8) == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow
def test_compiles_as_one_graph():
    """The mean's denominator (tokens not ignored, or num_items_in_batch) stays a device tensor, so torch.compile
    (aot_eager, fullgraph) traces the patched model's loss without a host sync, with the eager gradients."""
    model = causal_lm("llama")
    fastft.patch(model, fused_loss=True)
    ids = batch(7)
    labels = ids.clone()
    labels[0, :5] = -100  # ignored tokens: the denominator counts the others
    model(input_ids=ids, labels=labels).loss.backward()
    eager = {name: param.grad.clone() for name, param in model.named_parameters()}
    model.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    compiled(input_ids=ids, labels=labels).loss.backward()
    for name, param in model.named_parameters():
        assert rel_error(param.grad, eager[name]) < 1e-5, name


def test_lora_model_training_and_what_the_outputs_hold():
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    reference_model = get_peft_model(causal_lm("llama"), config)
    patched = copy.deepcopy(reference_model)
    fastft.patch(patched, fused_loss=True)
    assert causal_lm_losses(patched, batch, 6) == pytest.approx(causal_lm_losses(reference_model, batch, 6), rel=1e-5)
    ids = batch(9)
    outputs = patched(input_ids=ids, labels=ids, output_hidden_states=True)
    assert outputs.logits is None and len(outputs.hidden_states) == 3  # training with labels: no logits
    assert patched(input_ids=ids).logits.shape == (2, 16, VOCAB)  # no labels: transformers' forward
    patched.eval()
    reference_model.eval()
    with torch.no_grad():  # evaluation: transformers' forward, logits included
        evaluated, expected = patched(input_ids=ids, labels=ids), reference_model(input_ids=ids, labels=ids)
    assert evaluated.logits.shape == (2, 16, VOCAB) and torch.allclose(evaluated.loss, expected.loss, rtol=1e-5)
    # eval mode with gradients (a Fisher estimate, a loop that never called train()): the fused loss, same gradients
    fused = patched(input_ids=ids, labels=ids)
    assert fused.logits is None and torch.allclose(fused.loss, expected.loss, rtol=1e-5)
    fused.loss.backward()
    reference_model(input_ids=ids, labels=ids).loss.backward()
    theirs = dict(reference_model.named_parameters())
    for name, param in patched.named_parameters():
        if param.requires_grad:
            assert rel_error(param.grad, theirs[name].grad) < 1e-5, name
    assert fastft.unpatch(patched) == 15
    assert type(patched.base_model.model) is LlamaForCausalLM


def test_saves_no_logits_for_backward():
    """transformers' loss keeps a (tokens x vocab) fp32 tensor for backward; the fused loss keeps the gradient of the
    hidden states instead (tokens x hidden), its logits gradient having been consumed chunk by chunk."""
    model = causal_lm("llama")
    model.lm_head.weight.requires_grad_(False)  # a frozen head, as in LoRA fine-tuning
    patched = copy.deepcopy(model)
    fastft.patch(patched, fused_loss=True)
    ids = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(0))
    saved = {name: saved_for_backward_bytes(lambda m=m: m(input_ids=ids, labels=ids).loss, exclude=list(m.parameters()))
             for name, m in (("transformers", model), ("fastft", patched))}
    assert saved["transformers"] - saved["fastft"] >= ids.numel() * (VOCAB - model.config.hidden_size) * 4


def test_unsupported_model_types_are_reported():
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=32))
    report = fastft.patch(gpt2, fused_loss=True)
    assert not report.fused and "model type 'gpt2' is not one whose logits are exactly lm_head" in str(report)


def test_trainer_with_gradient_accumulation(tmp_path, monkeypatch):
    """HF Trainer passes num_items_in_batch with gradient accumulation: the fused loss divides by it too."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from fastft.integrations import causal_lm as integration

    denominators = []

    def recorded(*args, num_items_in_batch=None, **kwargs):
        denominators.append(num_items_in_batch)
        return fused_linear_cross_entropy(*args, num_items_in_batch=num_items_in_batch, **kwargs)

    monkeypatch.setattr(integration, "fused_linear_cross_entropy", recorded)

    rows = [{"input_ids": batch(i)[0].tolist(), "labels": batch(i)[0].tolist()} for i in range(8)]
    results = {}
    for name in ("transformers", "fastft"):
        model = causal_lm("qwen2")
        if name == "fastft":
            fastft.patch(model, fused_loss=True)
        args = TrainingArguments(output_dir=str(tmp_path / name), per_device_train_batch_size=2,
                                 gradient_accumulation_steps=2, max_steps=2, learning_rate=1e-3, report_to=[],
                                 logging_steps=1, use_cpu=True, save_strategy="no", seed=0, data_seed=0)
        trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows))
        trainer.train()
        results[name] = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert results["fastft"] == pytest.approx(results["transformers"], rel=1e-5)
    assert len(denominators) == 4 and all(int(d) == 2 * 2 * 15 for d in denominators)  # 4 x 15 shifted labels
