"""fastft.patch on real peft models (random-init transformers models from small configs): peft's contract."""

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import layer as peft_lora
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

import fastft
from conftest import causal_lm_losses
from fastft.integrations.class_swap import original_class

VOCAB = 128


def base_model(kind):
    torch.manual_seed(0)
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(LlamaConfig(**common)) if kind == "llama" else Qwen2ForCausalLM(Qwen2Config(**common))


def lora_config(kind, dropout=0.0, **extra):
    targets = ["c_attn", "c_proj", "c_fc"] if kind == "gpt2" else "all-linear"
    return LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=targets, init_lora_weights=False,
                      fan_in_fan_out=kind == "gpt2", **extra)


def peft_pair(kind="llama", dropout=0.0, **extra):
    model = get_peft_model(base_model(kind), lora_config(kind, dropout, **extra))
    return model, copy.deepcopy(model)


def batch(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (2, 12), generator=generator)


def losses_over_steps(model, steps):
    return causal_lm_losses(model, batch, steps)


@pytest.mark.parametrize("kind", ("llama", "qwen2", "gpt2"))
def test_patched_training_matches_peft(kind):
    reference, patched = peft_pair(kind)
    report = fastft.patch(patched)
    expected_layers = {"llama": 14, "qwen2": 14, "gpt2": 8}[kind]  # gpt2: c_attn, c_fc and two c_proj per block
    assert report.fused["lora.Linear"] == expected_layers and not report.unfused
    ours, theirs = losses_over_steps(patched, 30), losses_over_steps(reference, 30)
    for a, b in zip(ours, theirs):
        assert abs(a - b) <= 1e-5 * abs(b)
    trained = dict(reference.named_parameters())
    for name, param in patched.named_parameters():
        if param.requires_grad:
            assert torch.allclose(param, trained[name], rtol=1e-5, atol=1e-6), name


@pytest.mark.parametrize("kind", ("llama", "gpt2"))
def test_lora_bias_trains_like_peft(kind):
    """peft's lora_bias=True (a bias on lora_B): added in place into Llama's base outputs, out of place into GPT-2's
    Conv1D views; 10 AdamW steps give peft's losses and trained biases."""
    reference, patched = peft_pair(kind, lora_bias=True)
    assert fastft.patch(patched).fused["lora.Linear"] == {"llama": 14, "gpt2": 8}[kind]
    ours, theirs = losses_over_steps(patched, 10), losses_over_steps(reference, 10)
    for a, b in zip(ours, theirs):
        assert abs(a - b) <= 1e-5 * abs(b)
    trained = dict(reference.named_parameters())
    biases = [(name, param) for name, param in patched.named_parameters() if "lora_B" in name and "bias" in name]
    assert len(biases) == {"llama": 14, "gpt2": 8}[kind]
    for name, param in biases:
        # A key bias's gradient is 0 up to rounding (softmax ignores a shift of all of a query's scores), and AdamW
        # steps on that rounding noise's sign: compared at AdamW's scale (lr 1e-3 per step).
        atol = 1e-4 if "k_proj" in name else 1e-6
        assert torch.allclose(param, trained[name], rtol=1e-5, atol=atol), name


def outputs(model, **kwargs):
    ids = batch(99)
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


def assert_close(ours, peft):
    """fp32 rounding apart: sibling projections' rank-r products run as one GEMM (another summation blocking)."""
    assert torch.allclose(ours, peft, rtol=1e-5, atol=1e-6)


def test_peft_contract_is_kept():
    reference, patched = peft_pair()
    params_before = [(n, p.data_ptr()) for n, p in patched.named_parameters()]
    buffers_before = [n for n, _ in patched.named_buffers()]
    report = fastft.patch(patched)
    assert "fused 14 module(s)" in str(report) and "lora.Linear: 14" in str(report)
    assert [(n, p.data_ptr()) for n, p in patched.named_parameters()] == params_before
    assert [n for n, _ in patched.named_buffers()] == buffers_before
    assert_close(outputs(patched), outputs(reference))

    for model in (reference, patched):  # several adapters active at once, and scaling changed at run time
        torch.manual_seed(1)  # the same random init of the new adapter in both
        model.add_adapter("second", lora_config("llama"))
        model.base_model.set_adapter(["default", "second"])
    fastft.patch(patched)  # new adapter layers are already the patched instances
    assert_close(outputs(patched), outputs(reference))
    for model in (reference, patched):
        for module in model.modules():
            if isinstance(module, peft_lora.LoraLayer):
                module.scaling["second"] = 0.3
    assert_close(outputs(patched), outputs(reference))
    mixed = ["default", "second"]  # one adapter per sample: peft's mixed-batch path (eval only)
    for model in (reference, patched):
        model.eval()
    assert torch.equal(outputs(patched, adapter_names=mixed), outputs(reference, adapter_names=mixed))  # peft's path
    for model in (reference, patched):
        with model.disable_adapter():
            disabled = outputs(model)
    assert torch.equal(disabled, outputs(base_model("llama")))
    for model in (reference, patched):
        model.base_model.set_adapter("default")
        model.merge_adapter()
    assert torch.allclose(outputs(patched), outputs(reference))
    for model in (reference, patched):
        model.unmerge_adapter()
    assert torch.allclose(outputs(patched), outputs(reference), atol=1e-6)


def test_saved_adapter_is_unchanged_and_loads_in_plain_peft(tmp_path):
    reference, patched = peft_pair()
    fastft.patch(patched)
    reference.save_pretrained(tmp_path / "reference")
    patched.save_pretrained(tmp_path / "patched")
    ref_bytes = (tmp_path / "reference" / "adapter_model.safetensors").read_bytes()
    assert (tmp_path / "patched" / "adapter_model.safetensors").read_bytes() == ref_bytes
    loaded = PeftModel.from_pretrained(base_model("llama"), tmp_path / "patched")
    assert all(original_class(m) is None for m in loaded.modules())
    assert_close(outputs(patched), outputs(loaded))
    merged = patched.merge_and_unload()
    assert not any(isinstance(m, peft_lora.LoraLayer) for m in merged.modules())
    assert torch.allclose(outputs(merged), outputs(loaded), atol=1e-5)


def test_patch_is_per_instance_and_reversible():
    reference, patched = peft_pair()
    other = get_peft_model(base_model("llama"), lora_config("llama"))
    fastft.patch(patched)
    assert all(type(m) is peft_lora.Linear for m in other.modules() if isinstance(m, peft_lora.LoraLayer))
    assert fastft.unpatch(patched) == 14
    assert all(type(m) is peft_lora.Linear for m in patched.modules() if isinstance(m, peft_lora.LoraLayer))
    assert torch.equal(outputs(patched), outputs(reference))


@pytest.mark.parametrize("kind", ("llama", "gpt2"))
@pytest.mark.parametrize("dropout", (0.0, 0.1))
def test_dora_is_fused_and_trains_as_peft(kind, dropout):
    """DoRA (one active adapter, dense base): g * (W x + s B A x) with g = m / |W + s B A|_row computed without an
    out x in matrix; with dropout, peft's own dropout module draws the same masks. Same losses and magnitudes.

    The magnitudes are compared by how far training moved them: AdamW moves an element by about lr per step whatever
    its gradient's size, so an element whose gradient is a cancellation residue (fp32 rounding of its sum, which
    depends on the summation order and so on the CPU's vector width) may move differently by up to 2 lr per step.
    A few such elements are expected; the norm of the difference stays a small fraction of the norm of the update."""
    reference, patched = peft_pair(kind, dropout=dropout, use_dora=True)
    report = fastft.patch(patched)
    assert report.fused["lora.Linear"] == (8 if kind == "gpt2" else 14) and not report.unfused
    initial = {n: p.detach().clone() for n, p in reference.named_parameters() if "lora_magnitude_vector" in n}
    torch.manual_seed(7)
    expected = losses_over_steps(reference, 10)
    torch.manual_seed(7)
    assert losses_over_steps(patched, 10) == pytest.approx(expected, rel=1e-5)
    theirs = dict(reference.named_parameters())
    for name, param in patched.named_parameters():
        if "lora_magnitude_vector" in name:
            update = theirs[name].detach() - initial[name]
            assert update.norm() > 0, name
            assert (param.detach() - theirs[name].detach()).norm() <= 1e-3 * update.norm(), name


def test_two_active_dora_adapters_run_peft_forward():
    reference, patched = peft_pair(use_dora=True)
    fastft.patch(patched)
    for model in (reference, patched):
        torch.manual_seed(1)
        model.add_adapter("second", lora_config("llama", use_dora=True))
        model.base_model.set_adapter(["default", "second"])
    assert torch.equal(outputs(patched), outputs(reference))  # peft's own path, op for op


def test_dora_weight_norm_without_the_full_matrix():
    from fastft.integrations.peft import _dora_weight_norm

    g = torch.Generator().manual_seed(0)
    weight, lora_A, lora_B = torch.randn(70, 50, generator=g), torch.randn(8, 50, generator=g), torch.randn(70, 8,
                                                                                                          generator=g)
    expected = torch.linalg.norm(weight.double() + 0.7 * lora_B.double() @ lora_A.double(), dim=1)
    assert torch.allclose(_dora_weight_norm(weight, lora_A, lora_B, 0.7).double(), expected, rtol=1e-5)


def test_dora_on_a_4bit_base_is_reported():
    import tempfile

    from peft.tuners.lora.bnb import Linear4bit
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    with tempfile.TemporaryDirectory() as folder:
        base_model("llama").save_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32), dtype=torch.float32)
    model = get_peft_model(model, lora_config("llama", use_dora=True))
    report = fastft.patch(model)
    assert any(isinstance(m, Linear4bit) for m in model.modules())
    assert report.unfused and all("DoRA on a Linear4bit base" in r for r in report.unfused.values())


@pytest.mark.parametrize("use_reentrant", (False, True))
def test_dropout_is_off_in_eval_and_replays_under_checkpointing(use_reentrant):
    reference, patched = peft_pair(dropout=0.2)
    fastft.patch(patched)
    patched.eval()
    reference.eval()
    assert_close(outputs(patched), outputs(reference))
    patched.train()
    ids = batch(5)
    torch.manual_seed(123)
    plain = patched(input_ids=ids, labels=ids).loss
    plain.backward()
    grads = {n: p.grad.clone() for n, p in patched.named_parameters() if p.grad is not None}
    patched.zero_grad()
    patched.base_model.model.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    patched.base_model.model.enable_input_require_grads()  # what peft's prepare_model_for_kbit_training does
    torch.manual_seed(123)
    checkpointed = patched(input_ids=ids, labels=ids).loss
    checkpointed.backward()
    assert checkpointed.item() == plain.item()
    for name, grad in grads.items():
        assert torch.allclose(dict(patched.named_parameters())[name].grad, grad, rtol=1e-6, atol=1e-7), name
    torch.manual_seed(124)
    assert patched(input_ids=ids, labels=ids).loss.item() != plain.item()  # a new step draws new masks


def test_transformers_add_adapter_models_are_patched():
    reference = base_model("llama")
    torch.manual_seed(2)
    reference.add_adapter(lora_config("llama"))
    patched = copy.deepcopy(reference)
    report = fastft.patch(patched)
    assert report.fused["lora.Linear"] == 14
    ids = batch(3)
    reference(input_ids=ids, labels=ids).loss.backward()
    patched(input_ids=ids, labels=ids).loss.backward()
    assert_close(outputs(patched), outputs(reference))
    grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    assert grads and all(torch.allclose(p.grad, grads[n], rtol=1e-5, atol=1e-7)
                         for n, p in patched.named_parameters() if p.grad is not None)


def test_sibling_projections_share_one_call(monkeypatch):
    """q/k/v and gate/up form input groups: per layer, one lora_down call for q/k/v, one for gate/up, and one
    each for o_proj and down_proj; every call's u holds its members' rank-r products side by side."""
    from fastft.integrations import peft as integration

    reference, patched = peft_pair(dropout=0.1)
    report = fastft.patch(patched)
    assert sorted(report.input_groups) == [f"base_model.model.model.layers.{i}.{part}" for i in range(2) for part in
                                           ("mlp.(gate_proj, up_proj)", "self_attn.(q_proj, k_proj, v_proj)")]
    assert "LoRA input groups (one call for the siblings' rank-r terms): 4" in str(report)
    ranks = []
    real = integration.lora_ops.lora_down

    def counted(x, As, *args):
        ranks.append([A.shape[0] for A in As])
        return real(x, As, *args)

    monkeypatch.setattr(integration.lora_ops, "lora_down", counted)
    ids = batch(4)
    patched(input_ids=ids, labels=ids).loss.backward()
    assert ranks == [[8, 8, 8], [8], [8, 8], [8]] * 2
    patched.eval()
    reference.eval()
    assert_close(outputs(patched), outputs(reference))
    assert all(not group.pending and group.x is None for group in {
        m.__dict__["_fastft_input_group"] for m in patched.modules() if "_fastft_input_group" in m.__dict__})
    fastft.unpatch(patched)
    assert not any("_fastft_input_group" in m.__dict__ for m in patched.modules())


def test_groups_whose_members_read_different_inputs_stop_grouping():
    """BART's cross-attention: q_proj reads the decoder states, k_proj/v_proj the encoder's. The first call finds
    out, those groups stop (reported), self-attention groups stay, and training equals peft's."""
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    config = BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64,
                        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"], init_lora_weights=False)
    reference = get_peft_model(BartForConditionalGeneration(config), lora)
    patched = copy.deepcopy(reference)
    report = fastft.patch(patched)
    assert len(report.input_groups) == 3 and set(report.input_groups.values()) == {"grouped"}

    def seq2seq_batch(step):
        generator = torch.Generator().manual_seed(step)
        return (torch.randint(3, VOCAB, (2, 10), generator=generator),
                torch.randint(3, VOCAB, (2, 7), generator=generator))

    losses = {}
    for name, model in (("peft", reference), ("fastft", patched)):
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        losses[name] = []
        for step in range(5):
            ids, labels = seq2seq_batch(step)
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses[name].append(loss.item())
    assert losses["fastft"] == pytest.approx(losses["peft"], rel=1e-5)
    stopped = {name for name, state in report.input_groups.items() if state.startswith("stopped")}
    assert stopped == {"base_model.model.model.decoder.layers.0.encoder_attn.(q_proj, k_proj, v_proj)"}
    assert "stopped: the members read different inputs" in str(report)


def test_lora_terms_go_into_the_base_output_in_place_unless_unsafe(monkeypatch):
    """Same-dtype, non-view base outputs take the up-projections in place (addmm_); a hook on a base layer (which
    may hold its output, or see the shapes of its gradients) or a view (GPT-2's Conv1D) keeps peft's out-of-place
    sum, and the hooks see what they see with peft."""
    from fastft.integrations import peft as integration

    in_place = []
    real = integration.lora_ops.add_lora_up
    monkeypatch.setattr(integration.lora_ops, "add_lora_up", lambda *a: in_place.append(1) or real(*a))
    reference, patched = peft_pair()
    fastft.patch(patched)
    ids = batch(7)
    assert_close(outputs(patched), outputs(reference))
    assert len(in_place) == 14
    seen = {}
    for model, key in ((reference, "peft"), (patched, "fastft")):
        q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
        q_proj.base_layer.register_forward_hook(lambda m, args, out, key=key: seen.setdefault(key, out))
    in_place.clear()
    reference(input_ids=ids)
    patched(input_ids=ids)
    assert len(in_place) == 13
    assert torch.equal(seen["fastft"], seen["peft"])  # the hook's tensor is the base output, untouched
    grads = {}

    def keep_output_grad(key):
        def hook(module, grad_input, grad_output):
            grads.setdefault(key, grad_output[0])
        return hook

    for model, key in ((reference, "peft"), (patched, "fastft")):
        k_proj = model.base_model.model.model.layers[1].self_attn.k_proj
        k_proj.base_layer.register_full_backward_hook(keep_output_grad(key))
    in_place.clear()
    for model in (reference, patched):
        model(input_ids=ids, labels=ids).loss.backward()
    assert len(in_place) == 12 and grads["fastft"].shape == grads["peft"].shape == (2, 12, 32)
    assert torch.allclose(grads["fastft"], grads["peft"], rtol=1e-5, atol=1e-7)
    in_place.clear()
    gpt2_reference, gpt2 = peft_pair("gpt2")
    fastft.patch(gpt2)
    assert_close(outputs(gpt2), outputs(gpt2_reference))
    assert not in_place


@pytest.mark.slow
@pytest.mark.parametrize("dropout", (0.0, 0.1))
def test_patched_model_compiles(dropout):
    """torch.compile (aot_eager) of a patched model gives the eager loss and gradients; without dropout the whole
    model is one graph (with dropout, drawing each call's seed is a host sync, so dynamo breaks the graph there)."""
    _, patched = peft_pair(dropout=dropout)
    fastft.patch(patched)
    ids = batch(3)
    torch.manual_seed(0)
    patched(input_ids=ids, labels=ids).loss.backward()
    eager = {n: p.grad.clone() for n, p in patched.named_parameters() if p.grad is not None}
    patched.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(patched, backend="aot_eager", fullgraph=dropout == 0.0)
    torch.manual_seed(0)
    compiled(input_ids=ids, labels=ids).loss.backward()
    for name, param in patched.named_parameters():
        if param.grad is not None:
            assert torch.allclose(param.grad, eager[name], rtol=1e-5, atol=1e-7), name


def test_bf16_autocast_training_matches_peft_to_bf16_rounding():
    """Under bf16 autocast (TRL's default precision) both libraries round the same fp32 quantities to bf16, but not
    all in the same order, so their losses agree to bf16 rounding, not bit for bit: each step's loss within one
    bf16 unit roundoff (2^-8 relative) of peft's, over AdamW steps whose updates (~lr per parameter) do not grow
    a difference of rounding."""
    reference, patched = peft_pair()
    assert fastft.patch(patched).fused["lora.Linear"] == 14
    optimizers = {m: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
                  for m in (reference, patched)}
    for step in range(5):
        losses = []
        for model in (reference, patched):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(input_ids=batch(step), labels=batch(step)).loss
            loss.backward()
            optimizers[model].step()
            optimizers[model].zero_grad()
            losses.append(loss.item())
        assert abs(losses[1] - losses[0]) <= 2.0 ** -8 * abs(losses[0]), (step, losses)
