"""fastft.methods.optim_in_backward: AdamW stepped per parameter inside backward equals torch.optim.AdamW
stepped after backward (fp32, 1e-5 relative, losses and parameters over a few steps): full fine-tuning with a tied
head and the update in ragged slices, param groups and an LR schedule; freeze's top-k with the fused loss; a state
dict round trip; HF Trainer. It frees the gradients, and refuses what it cannot do (clipping, accumulation,
closures, frozen parameters); its hooks come off."""

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import fastft
from fastft.methods import optim_in_backward
from fastft.methods.freeze import freeze
from fastft.methods.optim_in_backward import AdamWInBackward, adamw_in_backward_for_trainer

VOCAB = 256


def llama(tied=True):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        tie_word_embeddings=tied)).train()


def ids(step, shape=(2, 11)):
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(step))


def assert_close(a, b, rtol=1e-5):
    assert torch.isfinite(a).all()
    assert (a - b).norm() <= rtol * b.norm().clamp_min(1e-12), ((a - b).norm(), b.norm())


def train(model, optimizer, steps=3, scheduler=None, check_grads_freed=False):
    losses = []
    for step in range(steps):
        loss = model(input_ids=ids(step), labels=ids(step)).loss
        loss.backward()
        if check_grads_freed:
            assert all(p.grad is None for p in model.parameters())
        optimizer.step()
        optimizer.zero_grad()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    return torch.tensor(losses)


def groups(model, weight_decay=0.1):
    decay = [p for n, p in model.named_parameters() if p.requires_grad and "norm" not in n]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and "norm" in n]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def assert_same_training(ours, plain):
    for (name, a), b in zip(ours.named_parameters(), plain.parameters()):
        assert_close(a.detach(), b.detach()), name


def test_full_fine_tuning_equals_adamw_with_groups_and_schedule(monkeypatch):
    monkeypatch.setattr(optim_in_backward, "CHUNK", 1000)  # updates in ragged slices (4096 = 4 x 1000 + 96)
    plain = llama(tied=True)
    ours = copy.deepcopy(plain)
    reference = torch.optim.AdamW(groups(plain), lr=3e-3, betas=(0.8, 0.95), eps=1e-7)
    optimizer = AdamWInBackward(groups(ours), lr=3e-3, betas=(0.8, 0.95), eps=1e-7)
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1 + s)) for o in (reference, optimizer)]
    expected = train(plain, reference, scheduler=schedules[0])
    got = train(ours, optimizer, scheduler=schedules[1], check_grads_freed=True)
    assert_close(got, expected)
    assert_same_training(ours, plain)
    state = optimizer.state_dict()  # AdamW's state layout: loads into plain AdamW
    assert state["param_groups"][0]["lr"] == reference.param_groups[0]["lr"]
    torch.optim.AdamW(groups(copy.deepcopy(plain))).load_state_dict(state)


def test_top_k_with_fused_loss_equals_adamw():
    plain = llama()
    freeze(plain, top_k=1)
    fastft.patch(plain, fused_loss=True)
    ours = copy.deepcopy(plain)
    params = lambda m: [p for p in m.parameters() if p.requires_grad]  # noqa: E731
    expected = train(plain, torch.optim.AdamW(params(plain), lr=1e-3))
    got = train(ours, AdamWInBackward(params(ours), lr=1e-3), check_grads_freed=True)
    assert_close(got, expected)
    assert_same_training(ours, plain)


def test_state_dict_round_trip_continues_the_same_run():
    model = llama()
    optimizer = AdamWInBackward(model.parameters(), lr=1e-3)
    train(model, optimizer, steps=2)
    resumed_model = copy.deepcopy(model)
    resumed = AdamWInBackward(resumed_model.parameters(), lr=1e-3)
    resumed.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # as if through torch.save / torch.load
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 0.5 ** s) for o in (optimizer, resumed)]
    expected = train(model, optimizer, steps=2, scheduler=schedules[0])
    assert_close(train(resumed_model, resumed, steps=2, scheduler=schedules[1]), expected)
    assert_same_training(resumed_model, model)


def test_trainer_equals_trainer_with_adamw(tmp_path):
    rows = [{"input_ids": ids(i, (11,)).tolist(), "labels": ids(i, (11,)).tolist()} for i in range(8)]

    def run(in_backward):
        model = llama()
        args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, learning_rate=1e-3,
                                 weight_decay=0.1, max_grad_norm=0.0, max_steps=3, lr_scheduler_type="linear",
                                 report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, seed=0,
                                 disable_tqdm=True, optim="adamw_torch")
        optimizers = (adamw_in_backward_for_trainer(model, args), None) if in_backward else (None, None)
        trainer = Trainer(model=model, args=args, train_dataset=rows, optimizers=optimizers)
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        return torch.tensor(losses), model

    (expected, plain), (got, ours) = run(False), run(True)
    assert len(got) == 3
    assert_close(got, expected)
    assert_same_training(ours, plain)


def test_refuses_clipping_accumulation_closure_and_frozen_parameters(tmp_path):
    model = llama()
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)  # max_grad_norm=1.0 default
    with pytest.raises(ValueError, match="max_grad_norm"):
        adamw_in_backward_for_trainer(model, args)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_grad_norm=0,
                             gradient_accumulation_steps=2)
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        adamw_in_backward_for_trainer(model, args)
    optimizer = AdamWInBackward(model.parameters(), lr=1e-3)
    model(input_ids=ids(0), labels=ids(0)).loss.backward()
    with pytest.raises(RuntimeError, match="accumulate"):
        model(input_ids=ids(1), labels=ids(1)).loss.backward()
    with pytest.raises(ValueError, match="closure"):
        optimizer.step(lambda: 0.0)
    optimizer.remove_hooks()  # from here on backward only accumulates gradients
    model(input_ids=ids(2), labels=ids(2)).loss.backward()
    assert model.lm_head.weight.grad is not None
    model.lm_head.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="require grad"):
        AdamWInBackward(model.parameters(), lr=1e-3)
