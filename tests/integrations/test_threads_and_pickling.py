"""Patched models and models with bottleneck adapters (random-init mini Llamas) shared between threads: every
forward gives the single-threaded output; and saved whole with torch.save / pickle / copy.deepcopy: the copy
gives the same outputs on fastft's forward, and unpatch / remove_adapters still work on it."""

import copy
import io
import pickle
import sys
import threading

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import layer as peft_lora
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import fastft
from fastft import adapters
from fastft.integrations import class_swap
from fastft.integrations import peft as lora_integration
from fastft.integrations.class_swap import original_class

VOCAB = 128
LENGTHS = (5, 9, 12, 16)  # one sequence length per thread: a branch given another thread's tensor fails or differs


def mini_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def lora_llama():
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False)
    return get_peft_model(mini_llama(), config)


def adapter_llama():
    """Houlsby adapters stacked with parallel ones, both away from their identity init."""
    model = mini_llama()
    adapters.add_adapters(model, adapters.AdapterConfig(placement="houlsby", reduction_factor=4), "language")
    adapters.add_adapters(model, adapters.AdapterConfig(placement="parallel", reduction_factor=4, scale=2.0), "task")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".fastft_adapters." in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def ids_of(length, seed=0):
    return torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(seed + length))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def swapped(model):
    return [m for m in model.modules() if original_class(m) is not None]


def run_in_threads(model, forwards=12):
    """len(LENGTHS) threads, each running `forwards` forwards of `model` on its own input, with the interpreter
    switching threads as often as it can; returns every thread's outputs and errors."""
    results = {length: [] for length in LENGTHS}
    errors = []
    start = threading.Barrier(len(LENGTHS))

    def work(length):
        ids = ids_of(length)
        start.wait()
        try:
            for _ in range(forwards):
                results[length].append(logits(model, ids))
        except Exception as error:  # reported by the test
            errors.append(error)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=work, args=(length,)) for length in LENGTHS]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    return results, errors


def assert_threads_match(model, forwards=12):
    expected = {length: logits(model, ids_of(length)) for length in LENGTHS}
    results, errors = run_in_threads(model, forwards)
    assert not errors, errors
    for length, outputs in results.items():
        assert len(outputs) == forwards
        for output in outputs:
            assert torch.allclose(output, expected[length], rtol=1e-6, atol=1e-6), (
                length, (output - expected[length]).abs().max().item())


def test_parallel_adapters_run_in_concurrent_forwards():
    model = adapter_llama().eval()
    assert_threads_match(model)
    assert adapters.active_adapters(model) == ["language", "task"]


def test_lora_input_groups_run_in_concurrent_forwards_and_keep_grouping(monkeypatch):
    model = lora_llama().eval()
    report = fastft.patch(model)
    assert len(report.input_groups) == 4
    assert_threads_match(model)
    assert set(report.input_groups.values()) == {"grouped"}, report.input_groups
    ranks = []
    real = lora_integration.lora_ops.lora_down
    monkeypatch.setattr(lora_integration.lora_ops, "lora_down",
                        lambda x, As, *a: ranks.append([A.shape[0] for A in As]) or real(x, As, *a))
    logits(model, ids_of(9))  # 18 rows: the general path (<= 16 rows under no grad take the decode path)
    assert ranks == [[8, 8, 8], [8], [8, 8], [8]] * 2  # q/k/v and gate/up still share one call per layer
    groups = {m.__dict__["_fastft_input_group"] for m in model.modules() if "_fastft_input_group" in m.__dict__}
    assert len(groups) == 4 and all(not group.pending and group.x is None for group in groups)


def test_a_shallow_copy_of_a_member_runs_alone_without_stopping_its_group():
    """A module copied outside the model (nn.DataParallel's replicas are such copies) shares its group object but
    is none of its members: it runs on its own, and the group keeps grouping."""
    model = lora_llama().eval()
    report = fastft.patch(model)
    attention = model.base_model.model.model.layers[0].self_attn
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        attention.q_proj(x)
        expected = attention.k_proj(x)
        attention.v_proj(x)
        replica = copy.copy(attention.k_proj)
        group = replica.__dict__["_fastft_input_group"]
        assert group is attention.k_proj.__dict__["_fastft_input_group"]
        assert torch.allclose(replica(x), expected, rtol=1e-6, atol=1e-6)
        attention.q_proj(x)  # q starts a round for q/k/v; the replica is not part of it
        assert torch.allclose(replica(x), expected, rtol=1e-6, atol=1e-6)
        assert torch.equal(attention.k_proj(x), expected)
        attention.v_proj(x)
    assert not group.pending and group.x is None
    assert set(report.input_groups.values()) == {"grouped"}


def save_and_load(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.fixture(params=("torch.save", "pickle", "deepcopy", "pickle, new classes"))
def round_trip(request, monkeypatch):
    def copy_of(model):
        if request.param == "torch.save":
            return save_and_load(model)
        if request.param == "deepcopy":
            return copy.deepcopy(model)
        data = pickle.dumps(model)
        if request.param == "pickle, new classes":  # as in a new process, where no class was swapped yet
            monkeypatch.setattr(class_swap, "_SUBCLASSES", {})
        return pickle.loads(data)

    return copy_of


def test_patched_lora_model_round_trips(round_trip, monkeypatch):
    model = lora_llama()
    report = fastft.patch(model)
    ids = ids_of(10)
    model.eval()
    expected = logits(model, ids)
    model.train()
    expected_loss = model(input_ids=ids, labels=ids).loss
    expected_loss.backward()
    expected_grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    loaded = round_trip(model)
    assert loaded is not model
    names = sorted({type(m).__name__ for m in swapped(loaded)})
    assert names == ["FastftLinear"] and len(swapped(loaded)) == report.fused["lora.Linear"] == 14
    assert all(original_class(m) is peft_lora.Linear for m in swapped(loaded))
    calls = []
    real = lora_integration.lora_ops.lora_down
    monkeypatch.setattr(lora_integration.lora_ops, "lora_down",
                        lambda x, As, *a: calls.append([A.shape[0] for A in As]) or real(x, As, *a))
    loss = loaded(input_ids=ids, labels=ids).loss
    assert calls == [[8, 8, 8], [8], [8, 8], [8]] * 2  # fastft's forward, with the input groups
    assert torch.allclose(loss, expected_loss, rtol=1e-6)
    loss.backward()
    for name, param in loaded.named_parameters():
        if name in expected_grads:
            assert torch.allclose(param.grad, expected_grads[name], rtol=1e-5, atol=1e-7), name
    loaded.eval()
    assert torch.equal(logits(loaded, ids), expected)
    groups = {m.__dict__["_fastft_input_group"] for m in loaded.modules() if "_fastft_input_group" in m.__dict__}
    loaded_modules = {id(m) for m in loaded.modules()}
    assert len(groups) == 4 and all(id(m) in loaded_modules for group in groups for m in group.members)
    assert_threads_match(loaded, forwards=4)
    assert fastft.unpatch(loaded) == 14
    assert not swapped(loaded) and not any("_fastft_input_group" in m.__dict__ for m in loaded.modules())
    assert torch.allclose(logits(loaded, ids), expected, rtol=1e-5, atol=1e-6)
    assert len(swapped(model)) == 14  # the original is still patched


def test_patched_torchao_qat_model_round_trips(round_trip, monkeypatch):
    pytest.importorskip("torchao")
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig
    from torchao.quantization.qat.linear import FakeQuantizedLinear

    from fastft.integrations import qat as qat_integration

    model = mini_llama()
    weight = IntxFakeQuantizeConfig(torch.int4, group_size=32, is_symmetric=True)
    activation = IntxFakeQuantizeConfig(torch.int8, granularity="per_token", is_symmetric=False)
    quantize_(model, QATConfig(activation_config=activation, weight_config=weight, step="prepare"),
              filter_fn=lambda module, name: isinstance(module, nn.Linear) and "lm_head" not in name)
    assert fastft.patch(model).fused["torchao.FakeQuantizedLinear"] == 14
    ids = ids_of(10)
    expected = logits(model, ids)
    loaded = round_trip(model)
    assert {type(m).__name__ for m in swapped(loaded)} == {"FastftFakeQuantizedLinear"}
    calls = []
    real = qat_integration.fake_quantize
    monkeypatch.setattr(qat_integration, "fake_quantize", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert torch.equal(logits(loaded, ids), expected)
    assert len(calls) == 28  # weight and activation of the 14 swapped layers: fastft's forward
    assert fastft.unpatch(loaded) == 14
    assert all(type(m) is FakeQuantizedLinear for m in loaded.modules() if isinstance(m, FakeQuantizedLinear))
    assert torch.equal(logits(loaded, ids), expected)


def test_fused_loss_model_round_trips(round_trip):
    model = mini_llama()
    assert fastft.patch(model, fused_loss=True).fused["causal LM loss (fused linear cross-entropy)"] == 1
    ids = ids_of(10)
    expected = model(input_ids=ids, labels=ids)
    loaded = round_trip(model)
    assert type(loaded).__name__ == "FastftLlamaForCausalLM" and original_class(loaded) is LlamaForCausalLM
    outputs = loaded(input_ids=ids, labels=ids)
    assert outputs.logits is None and expected.logits is None  # the fused loss ran
    assert torch.allclose(outputs.loss, expected.loss, rtol=1e-6)
    assert fastft.unpatch(loaded) == 1 and type(loaded) is LlamaForCausalLM
    assert loaded(input_ids=ids, labels=ids).logits.shape == (2, 10, VOCAB)


def test_patched_lora_model_with_fused_loss_saves_and_loads():
    model = lora_llama()
    fastft.patch(model, fused_loss=True)
    ids = ids_of(8)
    expected = model(input_ids=ids, labels=ids).loss
    loaded = save_and_load(model)
    assert len(swapped(loaded)) == 15
    outputs = loaded(input_ids=ids, labels=ids)
    assert outputs.logits is None and torch.allclose(outputs.loss, expected, rtol=1e-6)


def test_model_with_adapters_round_trips(round_trip):
    model = adapter_llama()
    ids = ids_of(10)
    expected = logits(model, ids)
    base = mini_llama()
    loaded = round_trip(model)
    assert torch.equal(logits(loaded, ids), expected)
    assert adapters.active_adapters(loaded) == ["language", "task"]
    assert_threads_match(loaded, forwards=4)
    adapters.set_active(loaded, "task")
    adapters.set_active(model, "task")
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    adapters.remove_adapters(loaded)
    assert not any(".fastft_adapters." in name for name, _ in loaded.named_parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in loaded.modules())
    assert all(p.requires_grad for p in loaded.parameters())
    assert torch.equal(logits(loaded, ids), logits(base, ids))
    assert adapters.active_adapters(model) == ["task"] and any(m._forward_pre_hooks for m in model.modules())


def test_parallel_adapters_added_after_loading_run():
    """A model saved with houlsby adapters, loaded, then given parallel ones (new hooks next to the loaded ones)."""
    model = mini_llama()
    adapters.add_adapters(model, adapters.AdapterConfig(placement="houlsby", reduction_factor=4), "language")
    loaded = save_and_load(model)
    for m in (model, loaded):
        torch.manual_seed(3)
        adapters.add_adapters(m, adapters.AdapterConfig(placement="parallel", reduction_factor=4), "task")
        with torch.no_grad():
            for name, p in m.named_parameters():
                if ".adapters.task." in name and "up" in name:
                    p.fill_(0.01)
    ids = ids_of(10)
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    assert not torch.equal(logits(loaded, ids), logits(mini_llama(), ids))
    adapters.remove_adapters(loaded)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in loaded.modules())


@pytest.mark.slow
def test_saved_patched_model_loads_in_a_new_process(tmp_path):
    """torch.load in a process that never patched anything: fastft's classes are made again on load."""
    import subprocess

    model = lora_llama()
    fastft.patch(model, fused_loss=True)
    ids = ids_of(8)
    expected = model(input_ids=ids, labels=ids).loss
    torch.save(model, tmp_path / "model.pt")
    torch.save({"ids": ids, "loss": expected.detach()}, tmp_path / "expected.pt")
    script = f"""
import torch
from fastft.integrations.class_swap import original_class
model = torch.load({str(tmp_path / "model.pt")!r}, weights_only=False)
expected = torch.load({str(tmp_path / "expected.pt")!r})
outputs = model(input_ids=expected["ids"], labels=expected["ids"])
assert outputs.logits is None and torch.allclose(outputs.loss, expected["loss"], rtol=1e-6), outputs.loss
print(sorted(type(m).__name__ for m in model.modules() if original_class(m) is not None))
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    names = run.stdout.strip().splitlines()[-1]
    assert names == str(sorted(["FastftLinear"] * 14 + ["FastftLlamaForCausalLM"]))
