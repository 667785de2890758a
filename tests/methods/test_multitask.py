"""fastft.methods.multitask: per-sample routed LoRA vs running each task's rows through its own peft adapter
(outputs and every adapter's gradients, fp32 1e-5), the op's gradcheck, loss weightings, task sampling; bad input."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import rel_error
from fastft.methods import adapters
from fastft.methods.multitask import (GradNorm, TaskHeads, TaskSampler, UncertaintyWeighting, routed_adapters,
                                      routed_lora, static_weighting)
from fastft.ops.routed_lora import routed_lora as routed_lora_op

VOCAB = 128
TASKS = ("t0", "t1", "t2", "t3")


def multi_adapter_model():
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    config = dict(target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, **config), adapter_name="t0")
    for i, name in enumerate(TASKS[1:]):
        model.add_adapter(name, LoraConfig(r=2 + 2 * i, lora_alpha=4 + i, **config))
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    return model


def lora_params(model):
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


def test_routed_batch_matches_per_task_runs_with_gradients():
    model = multi_adapter_model()
    ids = torch.randint(0, VOCAB, (7, 9), generator=torch.Generator().manual_seed(1))
    task_ids = torch.tensor([2, 0, 3, 0, 1, -1, 2])
    weight = torch.randn(7, 9, VOCAB, generator=torch.Generator().manual_seed(2))
    params = lora_params(model)
    with routed_lora(model, TASKS, task_ids):
        routed = model(input_ids=ids).logits
    routed_grads = torch.autograd.grad((routed * weight).sum(), list(params.values()))
    expected = torch.empty_like(routed)
    total = 0
    for t, name in enumerate(TASKS):
        rows = (task_ids == t).nonzero().flatten()
        model.set_adapter(name)
        expected[rows] = out = model(input_ids=ids[rows]).logits
        total = total + (out * weight[rows]).sum()
    rows = (task_ids == -1).nonzero().flatten()
    with model.disable_adapter():
        expected[rows] = out = model(input_ids=ids[rows]).logits
    total = total + (out * weight[rows]).sum()
    for p in params.values():
        p.requires_grad_(True)
    expected_grads = torch.autograd.grad(total, list(params.values()), allow_unused=True)
    assert rel_error(routed, expected) < 1e-5
    for n, g, e in zip(params, routed_grads, expected_grads):
        assert rel_error(g, e if e is not None else torch.zeros_like(g)) < 1e-5, n


@pytest.mark.parametrize("placement", ("houlsby", "parallel"))
def test_routed_bottleneck_adapters_match_per_task_runs(placement):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    for name in ("p", "q"):
        adapters.add_adapters(model, adapters.AdapterConfig(placement=placement, bottleneck_size=8, init="default"),
                              name=name, activate=False)
    params = {n: p for n, p in model.named_parameters() if "fastft_adapters" in n}
    with torch.no_grad():
        for p in params.values():
            p.normal_(0, 0.2)
    ids = torch.randint(0, VOCAB, (5, 7), generator=torch.Generator().manual_seed(4))
    task_ids = torch.tensor([1, 0, -1, 1, 0])
    with routed_adapters(model, ["p", "q"], task_ids):
        routed = model(input_ids=ids).logits
    routed_grads = torch.autograd.grad(routed.square().sum(), list(params.values()))
    expected, total = torch.empty_like(routed), 0
    for t, name in ((0, "p"), (1, "q"), (-1, None)):
        rows = (task_ids == t).nonzero().flatten()
        adapters.set_active(model, name)
        expected[rows] = out = model(input_ids=ids[rows]).logits
        total = total + out.square().sum()
    expected_grads = torch.autograd.grad(total, list(params.values()))
    assert rel_error(routed, expected) < 1e-5
    for n, g, e in zip(params, routed_grads, expected_grads):
        assert rel_error(g, e) < 1e-5, n
    with pytest.raises(ValueError, match="unknown adapter"):
        with routed_adapters(model, ["p", "zz"], [0]):
            pass


def test_layers_get_their_forward_back():
    model = multi_adapter_model()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    with routed_lora(model, TASKS, [0, 1]):
        assert "forward" in vars(layer)
    assert "forward" not in vars(layer)


def test_op_gradcheck_fp64():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(11, 6, dtype=torch.float64, generator=g, requires_grad=True)
    As = [torch.randn(r, 6, dtype=torch.float64, generator=g, requires_grad=True) for r in (2, 3, 1)]
    Bs = [torch.randn(5, r, dtype=torch.float64, generator=g, requires_grad=True) for r in (2, 3, 1)]
    route = torch.tensor([0, 2, 1, 1, -1, 0, 2, 2, 1, 0, -1])
    torch.autograd.gradcheck(lambda x, *w: routed_lora_op(x, list(w[:3]), list(w[3:]), [0.5, 2.0, 1.0], route),
                             (x, *As, *Bs))
    torch.library.opcheck(torch.ops.fastft.routed_lora.default, (x.detach(), [A.detach() for A in As],
                                                                  [B.detach() for B in Bs], [0.5, 2.0, 1.0], route))


def test_routing_bad_input():
    model = multi_adapter_model()
    with pytest.raises(ValueError, match=r"task_ids must be in \[-1, 4\)"):
        with routed_lora(model, TASKS, [0, 4]):
            pass
    with pytest.raises(ValueError, match="no LoRA adapter 'zzz'"):
        with routed_lora(model, ["t0", "zzz"], [0, 1]):
            pass


def test_weightings():
    losses = {"a": torch.tensor(2.0), "b": torch.tensor(0.5)}
    assert static_weighting(losses, {"a": 0.25, "b": 2.0}).item() == 1.5
    with pytest.raises(ValueError, match="weights has no entry"):
        static_weighting(losses, {"a": 1.0})
    uncertainty = UncertaintyWeighting(["a", "b"])
    with torch.no_grad():
        uncertainty.log_vars["a"].fill_(1.0)
    expected = 0.5 * torch.exp(torch.tensor(-1.0)) * 2.0 + 0.5 + 0.5 * 0.5
    assert abs(uncertainty(losses).item() - expected.item()) < 1e-6
    # GradNorm: the task whose gradient is larger gets its weight pushed down
    shared = torch.nn.Parameter(torch.ones(3))
    gradnorm = GradNorm(["a", "b"], [shared], alpha=1.0)
    task_losses = {"a": (10.0 * shared).sum(), "b": (0.1 * shared).sum()}
    total = gradnorm.loss(task_losses)
    assert abs(total.item() - 30.3) < 1e-4
    assert gradnorm.weights.grad[0] > 0 > gradnorm.weights.grad[1]


def test_task_heads_and_sampling():
    heads = TaskHeads(8, {"x": 3, "y": 2})
    assert heads("y", torch.randn(2, 5, 8)).shape == (2, 2)
    with pytest.raises(ValueError, match="unknown task 'z'"):
        heads("z", torch.randn(2, 5, 8))
    sampler = TaskSampler({"x": 10, "y": 30}, strategy="round_robin")
    assert [next(sampler) for _ in range(4)] == ["x", "y", "x", "y"]
    proportional = TaskSampler({"x": 10, "y": 30}, seed=1)
    share = sum(next(proportional) == "y" for _ in range(4000)) / 4000
    assert abs(share - 0.75) < 0.03  # binomial sd ~0.007
    hot = TaskSampler({"x": 10, "y": 30}, strategy="temperature", temperature=1e6)
    assert abs(hot.probabilities[0] - 0.5) < 1e-4
    with pytest.raises(ValueError, match="strategy must be one of"):
        TaskSampler({"x": 1}, strategy="random")
