"""fastft.methods.continual (EWC), replay and expansion on a tiny random Llama: the Fisher estimates vs their
definitions, the penalty gradient vs autograd of the formula (separate and online terms, LoRA-only and full
fine-tuning), the Trainer, the replay buffer's statistics and checkpoint, adapters per task; bad input."""

import copy
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

from conftest import rel_error
from fastft.methods import adapters
from fastft.methods.continual import EWC, EWCConfig, EWCTrainer, estimate_fisher
from fastft.methods.expansion import add_task, select_task, task_names
from fastft.methods.replay import ReplayBuffer, ReplayCollator, ReplayDataset, replayed_count

VOCAB = 128


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def batches(n, seed=0, size=3, length=10):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (size, length), generator=g)
        out.append({"input_ids": ids, "labels": ids})
    return out


def trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", ("empirical", "per_sample"))
def test_fisher_matches_its_definition(kind):
    model = tiny_llama()
    data = batches(2)
    fisher = estimate_fisher(model, data, kind=kind, progress=False)
    params = trainable(model)
    expected = {n: torch.zeros_like(p) for n, p in params.items()}
    parts = [b for b in data] if kind == "empirical" else \
        [{k: v[i:i + 1] for k, v in b.items()} for b in data for i in range(3)]
    for part in parts:
        grads = torch.autograd.grad(model(**part).loss, list(params.values()), allow_unused=True)
        for (n, _), g in zip(params.items(), grads):
            if g is not None:
                expected[n] += g * g / len(parts)
    assert all(p.grad is None for p in params.values())  # left as they were
    for n in params:
        assert rel_error(fisher[n], expected[n]) < 1e-5


def penalty_by_autograd(model, terms, lam):
    """(penalty, d penalty / d theta) of lam / 2 sum_t sum_i F (theta - theta*)^2 by autograd, fp64."""
    named = dict(model.named_parameters())
    leaves = {n: p.detach().double().requires_grad_() for n, p in named.items()}
    penalty = sum(lam / 2 * (f.double() * (leaves[n] - a.double()) ** 2).sum()
                  for term in terms for n, f, a in zip(term.names, term.fisher, term.anchor))
    used = sorted({n for term in terms for n in term.names})
    grads = torch.autograd.grad(penalty, [leaves[n] for n in used])
    return penalty.detach(), dict(zip(used, grads))


def perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainable(model).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("mode", ("separate", "online"))
@pytest.mark.parametrize("storage", (torch.float64, torch.float32, torch.bfloat16))
def test_penalty_gradient_matches_autograd_full_fine_tuning(mode, storage):
    model = tiny_llama().double() if storage == torch.float64 else tiny_llama()
    ewc = EWC(model, EWCConfig(lam=50.0, mode=mode, decay=0.5, storage_dtype=storage, progress=False))
    ewc.consolidate(batches(1, seed=1))
    perturb(model, 1)
    ewc.consolidate(batches(1, seed=2))
    perturb(model, 2)
    assert len(ewc.terms) == (2 if mode == "separate" else 1)
    penalty, expected = penalty_by_autograd(model, ewc.terms, 50.0)
    grads_before = {n: torch.randn_like(p) for n, p in trainable(model).items()}
    for n, p in trainable(model).items():
        p.grad = grads_before[n].clone()
    got = ewc.apply_()
    tol = 1e-12 if storage == torch.float64 else 1e-5
    assert rel_error(got, penalty) < tol
    for n, p in trainable(model).items():
        assert rel_error(p.grad, grads_before[n].double() + expected[n]) < tol


def test_online_fisher_is_decayed_sum():
    model = tiny_llama()
    ewc = EWC(model, EWCConfig(lam=1.0, mode="online", decay=0.3))
    params = trainable(model)
    f1 = {n: torch.rand_like(p) for n, p in params.items()}
    f2 = {n: torch.rand_like(p) for n, p in params.items()}
    ewc.consolidate(fisher=f1)
    perturb(model, 3)
    ewc.consolidate(fisher=f2)
    (term,) = ewc.terms
    for n, f, a in zip(term.names, term.fisher, term.anchor):
        assert rel_error(f, 0.3 * f1[n] + f2[n]) < 1e-6
        assert torch.equal(a, params[n].detach())


def test_lora_only_parameters_and_trainer_step():
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    ewc = EWC(model, EWCConfig(lam=10.0, progress=False))
    ewc.consolidate(batches(1))
    assert ewc.terms[0].names and all("lora_" in n for n in ewc.terms[0].names)
    perturb(model, 4)
    snapshot = copy.deepcopy(model.state_dict())
    data = batches(1, seed=5, size=2)[0]
    dataset = [{"input_ids": data["input_ids"][i], "labels": data["labels"][i]} for i in range(2)]
    args = TrainingArguments(output_dir="/tmp/fastft-ewc-test", per_device_train_batch_size=2, max_steps=1,
                             learning_rate=0.1, lr_scheduler_type="constant", optim="sgd", report_to=[],
                             save_strategy="no", use_cpu=True, logging_steps=1, disable_tqdm=True, seed=0)
    EWCTrainer(model=model, args=args, train_dataset=dataset, ewc=ewc).train()
    # SGD: theta' = theta - lr * (grad of the loss + lam F (theta - theta*))
    expected_model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    expected_model.load_state_dict(snapshot)
    loss = expected_model(**data).loss
    params = trainable(expected_model)
    grads = torch.autograd.grad(loss, list(params.values()))
    term = ewc.terms[0]
    for (n, p), g in zip(params.items(), grads):
        i = term.names.index(n)
        step = g + 10.0 * term.fisher[i] * (p.detach() - term.anchor[i])
        assert rel_error(dict(model.named_parameters())[n].detach(), p.detach() - 0.1 * step) < 1e-5


def test_state_dict_round_trip():
    model = tiny_llama()
    ewc = EWC(model, EWCConfig(lam=2.0))
    ewc.consolidate(fisher={n: torch.rand_like(p) for n, p in trainable(model).items()})
    other = EWC(model, EWCConfig(lam=2.0))
    other.load_state_dict(ewc.state_dict())
    perturb(model, 6)
    for p in trainable(model).values():
        p.grad = torch.zeros_like(p)
    a = ewc.apply_()
    grads = [p.grad.clone() for p in trainable(model).values()]
    for p in trainable(model).values():
        p.grad = torch.zeros_like(p)
    assert torch.equal(other.apply_(), a)
    assert all(torch.equal(p.grad, g) for p, g in zip(trainable(model).values(), grads))


def test_ewc_bad_input():
    model = tiny_llama()
    with pytest.raises(ValueError, match="lam must be a finite real number >= 0"):
        EWCConfig(lam=-1.0)
    with pytest.raises(ValueError, match="mode must be one of"):
        EWCConfig(mode="sometimes")
    ewc = EWC(model, EWCConfig())
    fisher = {n: torch.rand_like(p) for n, p in trainable(model).items()}
    fisher["model.norm.weight"] = torch.rand(3)
    with pytest.raises(ValueError, match=r"fisher\['model.norm.weight'\] must have its parameter's shape \(64,\)"):
        ewc.consolidate(fisher=fisher)
    with pytest.raises(ValueError, match="loader gave no batch"):
        ewc.consolidate([])


def test_reservoir_keeps_a_uniform_sample():
    counts = torch.zeros(100)
    for seed in range(400):
        buffer = ReplayBuffer(10, seed=seed)
        buffer.extend(range(100))
        assert len(buffer) == 10 and buffer.seen == 100
        counts[list(buffer.items)] += 1
    # each of the 100 examples is kept with probability 0.1: 40 expected of 400, binomial sd 6
    assert counts.min() >= 40 - 5 * 6 and counts.max() <= 40 + 5 * 6
    assert abs(counts[:50].sum() - counts[50:].sum()) < 5 * math.sqrt(4000 * 0.9)


def test_replay_mixing_checkpoint_and_errors():
    buffer = ReplayBuffer(8, seed=1)
    buffer.extend(range(1000, 1020))
    state = buffer.state_dict()
    restored = ReplayBuffer(1)
    restored.load_state_dict(state)
    assert restored.sample(5) == buffer.sample(5)  # same items and random state
    collator = ReplayCollator(lambda rows: rows, buffer, ratio=0.25)
    batch = collator(list(range(6)))
    assert batch[:6] == list(range(6)) and len(batch) == 6 + replayed_count(6, 0.25) == 8
    assert all(x in buffer.items for x in batch[6:])
    mixed = ReplayDataset(list(range(30)), buffer, ratio=0.25)
    assert len(mixed) == 40 and sum(mixed[i] >= 1000 for i in range(len(mixed))) == 10
    with pytest.raises(ValueError, match="replay buffer is empty"):
        ReplayBuffer(4).sample(1)
    with pytest.raises(ValueError, match="replay buffer is empty"):
        ReplayCollator(lambda rows: rows, ReplayBuffer(4), ratio=0.5)
    with pytest.raises(ValueError, match="ratio must be a number in"):
        ReplayCollator(lambda rows: rows, buffer, ratio=1.0)
    with pytest.raises(ValueError, match="capacity must be an int >= 1"):
        ReplayBuffer(0)


def test_lora_expansion_freezes_earlier_tasks():
    model = add_task(tiny_llama(), "first", LoraConfig(r=4, target_modules=["q_proj"]))
    first = {n: p.detach().clone() for n, p in model.named_parameters() if ".first." in n}
    model = add_task(model, "second", LoraConfig(r=4, target_modules=["q_proj"]))
    assert task_names(model) == ["first", "second"]
    names = list(trainable(model))
    assert names and all(".second." in n for n in names)
    loss = model(**batches(1)[0]).loss
    loss.backward()
    torch.optim.SGD(trainable(model).values(), lr=1.0).step()
    assert all(torch.equal(p, first[n]) for n, p in model.named_parameters() if ".first." in n)
    select_task(model, "first")
    assert model.active_adapter == "first"
    with pytest.raises(ValueError, match="unknown task 'third'"):
        select_task(model, "third")


def test_bottleneck_expansion_selects_by_task():
    model = tiny_llama()
    ids = batches(1)[0]["input_ids"]
    add_task(model, "a", adapters.AdapterConfig(bottleneck_size=8, init="default"))
    add_task(model, "b", adapters.AdapterConfig(bottleneck_size=8, init="default"))
    assert adapters.active_adapters(model) == ["b"]
    assert all(".b." in n for n in trainable(model))
    with torch.no_grad():  # make the adapters differ from identity
        for n, p in model.named_parameters():
            if "fastft_adapters" in n:
                p.normal_(0, 0.1)
        out_b = model(input_ids=ids).logits
        select_task(model, "a")
        out_a = model(input_ids=ids).logits
    assert all(".a." in n for n in trainable(model))
    assert not torch.allclose(out_a, out_b)
    with pytest.raises(ValueError, match="unknown task"):
        select_task(model, "c")
