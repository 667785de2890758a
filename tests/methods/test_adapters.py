"""fastft.adapters on real transformers models (random-init, small configs): placement, identity at init,
training touches only adapters, fused vs plain-torch adapters, stacking, save/load, removal."""

import copy

import pytest
import torch
from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM)

import fastft
from fastft import adapters
from fastft.nn import BottleneckAdapter, NF4Linear
from fastft.reference.bottleneck import bottleneck_adapter_ref

VOCAB = 128
KINDS = ("llama", "qwen2", "gpt2", "bert")
OUTPUT_PROJECTIONS = {  # what each placement should find, for layer 0
    "llama": ("model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"),
    "qwen2": ("model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"),
    "gpt2": ("transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_proj"),
    "bert": ("bert.encoder.layer.0.attention.output.dense", "bert.encoder.layer.0.output.dense"),
}


def base_model(kind):
    torch.manual_seed(0)
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    if kind == "bert":
        return BertForSequenceClassification(BertConfig(
            vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3))
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(LlamaConfig(**common)) if kind == "llama" else Qwen2ForCausalLM(Qwen2Config(**common))


def batch(seed=0):
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))


def loss_of(model, kind, seed=0):
    ids = batch(seed)
    if kind == "bert":
        return model(input_ids=ids, labels=torch.tensor([seed % 3, (seed + 1) % 3])).loss
    return model(input_ids=ids, labels=ids).loss


def outputs(model):
    with torch.no_grad():
        return model(input_ids=batch(99)).logits


def train(model, kind, steps, lr=1e-2):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for step in range(steps):
        loss = loss_of(model, kind)  # one batch: the loss must fall
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def perturb(model, name, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if f".adapters.{name}." in key:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("placement", adapters.PLACEMENTS)
def test_fresh_adapters_are_identity_and_sit_where_expected(kind, placement):
    model = base_model(kind)
    before = outputs(model)
    placed = adapters.add_adapters(model, adapters.AdapterConfig(placement=placement, reduction_factor=4))
    attention_out, ffn_out = OUTPUT_PROJECTIONS[kind]
    expected = [attention_out, ffn_out] if placement == "houlsby" else [ffn_out]
    assert placed[:len(expected)] == expected and len(placed) == 2 * len(expected)
    assert torch.equal(outputs(model), before)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".fastft_adapters." in n for n in trainable)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("placement", adapters.PLACEMENTS)
def test_training_changes_only_adapters_and_matches_plain_torch_adapters(kind, placement, monkeypatch):
    config = adapters.AdapterConfig(placement=placement, reduction_factor=4, activation="gelu",
                                    layer_norm=placement == "pfeiffer", scale=2.0)
    model = base_model(kind)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    adapters.add_adapters(model, config)
    plain = copy.deepcopy(model)
    fused_losses = train(model, kind, 20)

    def plain_forward(self, h, residual=None):
        norm = self.norm
        return bottleneck_adapter_ref(h, self.down.weight, self.down.bias, self.up.weight, self.up.bias,
                                      self.activation, self.scale, residual,
                                      norm.weight if norm else None, norm.bias if norm else None, norm is not None,
                                      norm.eps if norm else 1e-5)

    monkeypatch.setattr(BottleneckAdapter, "forward", plain_forward)
    plain_losses = train(plain, kind, 20)
    assert fused_losses[-1] < fused_losses[0]
    for ours, theirs in zip(fused_losses, plain_losses):
        assert abs(ours - theirs) <= 1e-5 * abs(theirs)
    after = model.state_dict()
    for key, value in base.items():
        assert torch.equal(after[key], value), key
    adapter_keys = [k for k in after if k not in base]
    assert adapter_keys and all(".fastft_adapters.adapters.default." in k for k in adapter_keys)
    assert all(after[k].abs().max() > 0 for k in adapter_keys if k.endswith("up.weight"))  # trained away from 0


@pytest.mark.parametrize("kind", ("llama", "gpt2", "bert"))
def test_save_load_round_trip_and_removal(kind, tmp_path):
    model = base_model(kind)
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = outputs(model)
    adapters.add_adapters(model, adapters.AdapterConfig(reduction_factor=8, activation="silu"), "task")
    train(model, kind, 3)
    adapted = outputs(model)
    assert not torch.allclose(adapted, before)
    adapters.save_adapter(model, tmp_path / "task", "task")
    saved = adapters.adapter_state_dict(model, "task")
    assert sorted(p.name for p in (tmp_path / "task").iterdir()) == ["adapter_config.json",
                                                                     "adapter_model.safetensors"]

    fresh = base_model(kind)
    assert adapters.load_adapter(fresh, tmp_path / "task") == "task"
    assert torch.equal(outputs(fresh), adapted)
    assert all(torch.equal(v, adapters.adapter_state_dict(fresh, "task")[k]) for k, v in saved.items())

    adapters.remove_adapters(model)
    assert torch.equal(outputs(model), before)
    assert list(model.state_dict()) == list(before_state)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before_state.items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not hasattr(model, "fastft_adapter_state")
    assert not any(type(m).__name__ == "AdapterSlot" for m in model.modules())


def test_named_adapters_stack_and_switch():
    model = base_model("llama")
    base = outputs(model)
    adapters.add_adapters(model, adapters.AdapterConfig(reduction_factor=4), "language")
    adapters.add_adapters(model, adapters.AdapterConfig(placement="parallel", reduction_factor=8), "task")
    perturb(model, "language", 1)
    perturb(model, "task", 2)
    assert adapters.active_adapters(model) == ["language", "task"]
    stacked = outputs(model)
    adapters.set_active(model, "language")
    language = outputs(model)
    adapters.set_active(model, ["task"])
    task = outputs(model)
    adapters.set_active(model, None)
    assert torch.equal(outputs(model), base)
    assert len({tuple(t.flatten()[:8].tolist()) for t in (base, stacked, language, task)}) == 4
    adapters.set_active(model, ["language", "task"])
    assert torch.equal(outputs(model), stacked)
    adapters.remove_adapters(model, "task")
    assert adapters.active_adapters(model) == ["language"]
    assert torch.equal(outputs(model), language)


def test_heads_can_stay_trainable_and_flags_are_restored():
    model = base_model("bert")
    adapters.add_adapters(model, modules_to_train=["classifier"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"classifier.weight", "classifier.bias"} <= trainable
    assert all(n.startswith("classifier.") or ".fastft_adapters." in n for n in trainable)
    adapters.remove_adapters(model)
    assert all(p.requires_grad for p in model.parameters())


def test_bad_input_is_named(tmp_path):
    model = base_model("llama")
    with pytest.raises(ValueError, match="placement must be one of"):
        adapters.AdapterConfig(placement="middle")
    with pytest.raises(ValueError, match="activation must be one of"):
        adapters.AdapterConfig(activation="tanh")
    with pytest.raises(ValueError, match="modules_to_train"):
        adapters.add_adapters(model, modules_to_train=["head"])
    assert not hasattr(model, "fastft_adapter_state")
    adapters.add_adapters(model, name="a")
    with pytest.raises(ValueError, match="already exists"):
        adapters.add_adapters(model, name="a")
    with pytest.raises(ValueError, match="unknown adapter"):
        adapters.set_active(model, ["b"])
    with pytest.raises(ValueError, match="no transformer blocks"):
        adapters.add_adapters(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    adapters.save_adapter(model, tmp_path / "a", "a")
    other = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ValueError, match="saved shape"):
        adapters.load_adapter(other, tmp_path / "a")
    assert not hasattr(other, "fastft_adapter_state")
    with pytest.raises(ValueError, match="hidden_size"):
        BottleneckAdapter(64)(torch.randn(2, 32))


def test_bottleneck_adapter_names_bad_dtypes_and_devices():
    """An integer h is not returned unchanged (a fresh adapter is the identity), a meta h with CPU parameters is
    not answered with a meta tensor: both are errors naming the argument (and, for devices, both devices)."""
    adapter = BottleneckAdapter(16, 4, layer_norm=True)
    h = torch.randn(2, 3, 16)
    with pytest.raises(TypeError, match="h must be a floating tensor, got torch.int64"):
        adapter(torch.arange(96).reshape(2, 3, 16))
    with pytest.raises(TypeError, match="h must be a floating tensor, got list"):
        adapter([[0.0] * 16])
    with pytest.raises(TypeError, match="residual must be None or a floating tensor, got torch.int64"):
        adapter(h, residual=torch.zeros(2, 3, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="h is on meta but the adapter's parameter down.weight is on cpu"):
        adapter(h.to("meta"))
    with pytest.raises(ValueError, match="residual is on meta but h is on cpu"):
        adapter(h, residual=h.to("meta"))
    adapter.norm.to("meta")
    with pytest.raises(ValueError, match="h is on cpu but the adapter's parameter norm.weight is on meta"):
        adapter(h)
    adapter.to("meta")  # every tensor on meta: shapes only
    assert adapter(h.to("meta"), residual=h.to("meta")).shape == h.shape
    fp32_on_bf16 = BottleneckAdapter(16, 4)  # adapters may keep another floating dtype than h
    assert fp32_on_bf16(h.bfloat16()).dtype == torch.bfloat16


def test_gradient_checkpointing_gives_the_same_gradients():
    model = base_model("llama")
    adapters.add_adapters(model, adapters.AdapterConfig(placement="parallel", reduction_factor=4))
    perturb(model, "default", 0)
    checkpointed = copy.deepcopy(model)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed.train()
    model.train()
    loss_of(model, "llama").backward()
    loss_of(checkpointed, "llama").backward()
    for (name, p), q in zip(model.named_parameters(), checkpointed.parameters()):
        if p.requires_grad:
            assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-7), name


@pytest.mark.parametrize("placement", ("houlsby", "parallel"))
def test_torch_compile_traces_adapters_as_one_graph(placement):
    """The adapters' forward hooks and fastft::bottleneck_adapter / bottleneck_backward trace under torch.compile
    (fullgraph) and give the eager loss and gradients."""
    model = base_model("llama")
    adapters.add_adapters(model, adapters.AdapterConfig(placement=placement, reduction_factor=4))
    perturb(model, "default", 0)
    model.train()
    compiled = copy.deepcopy(model)
    compiled.forward = torch.compile(compiled.forward, backend="aot_eager", fullgraph=True)
    eager_loss, compiled_loss = loss_of(model, "llama"), loss_of(compiled, "llama")
    eager_loss.backward()
    compiled_loss.backward()
    assert torch.allclose(eager_loss, compiled_loss, rtol=1e-6)
    for (name, p), q in zip(model.named_parameters(), compiled.parameters()):
        if p.requires_grad:
            assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-7), name


@pytest.mark.parametrize("placement", ("houlsby", "parallel"))
def test_adapters_on_a_4bit_quantize_model_base(placement):
    """A fastft.quantize_model base (NF4Linear projections, no bitsandbytes): adapters sit after the same projections
    as on the dense model and train as on the dense model holding the dequantized weights."""
    quantized = fastft.quantize_model(base_model("llama"), blocksize=32)
    dense = copy.deepcopy(quantized)
    for name, module in list(dense.named_modules()):
        if isinstance(module, NF4Linear):
            parent, _, child = name.rpartition(".")
            setattr(dense.get_submodule(parent), child, module.to_linear())
    config = adapters.AdapterConfig(placement=placement, reduction_factor=4, activation="gelu")
    placed = []
    for model in (quantized, dense):
        torch.manual_seed(2)
        placed.append(adapters.add_adapters(model, config))
    assert placed[0] == placed[1] and len(placed[0]) == (4 if placement == "houlsby" else 2)
    for ours, theirs in zip(train(quantized, "llama", 10), train(dense, "llama", 10)):
        assert abs(ours - theirs) <= 1e-5 * abs(theirs)
