"""fastft's fused preference and head-reading losses under DDP ("ddp") and FSDP2 (gloo, 2 processes on 127.0.0.1):
`fully_shard` per decoder layer and on the root, with the head in the root's group ("fsdp2-root") or sharded on its
own ("fsdp2-head": its forward never runs, so only fastft's gather gives the loss the whole head, trl#3368's case).
TRL's DPO and GRPO losses on fastft's head (`fastft.patch(trainer)`), fastft's fused causal-LM loss (on a dense head,
and on a 4-bit head: fastft's NF4 storage and bitsandbytes', their codes sharded by FSDP2), the distillation loss,
and fastft::fused_linear_logprobs called directly train a LoRA on lm_head (or, for the op, the whole model): 5 SGD
steps give the losses and trained weights of one process accumulating the same per-rank batches (fp32, 1e-5). With
the head sharded on its own, each step also runs the loss under torch.no_grad (a reference / old-policy / eval pass):
fastft reshards the head after such a use, leaves a head gathered for a pending backward gathered, and gathers it
again in that backward when something else (FSDP2, after a forward of the head itself) resharded it meanwhile."""

import copy
import functools

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from peft import LoraConfig, get_peft_model
from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer
from trl.trainer.utils import add_fused_lm_head

import fastft
from fastft.integrations.trl import trl_head_options
from fastft.losses import fused_linear_logprobs
from test_distributed import bitsandbytes_llama, decoder_layers, free_port, trained_weights
from trl_fixtures import preference_dataset, text_dataset, tiny_llama, tokenizer

WORLD, STEPS = 2, 5
LAYOUTS = ("ddp", "fsdp2-root", "fsdp2-head")
CASES = ("dpo-trainer", "grpo-trainer", "fused-loss", "fused-loss-4bit-head", "fused-loss-bnb-4bit-head",
         "distillation", "logprobs-op")
COMMON = dict(output_dir="/tmp/fastft-fsdp2-test", report_to=[], use_cpu=True, per_device_train_batch_size=2,
              logging_steps=1, save_strategy="no", bf16=False, dataloader_num_workers=0)
pytestmark = pytest.mark.slow


def lora_model(modules=("q_proj", "v_proj", "lm_head")):
    """LoRA on q/v and on lm_head: the head's adapter trains through the fused losses' gathered head weight."""
    return get_peft_model(tiny_llama(0), LoraConfig(r=4, lora_alpha=8, target_modules=list(modules),
                                                    init_lora_weights=False))


@functools.cache
def trainers():
    """A DPOTrainer and a GRPOTrainer (TRL 1.16), built once per process; each case gives them a fresh model with
    a LoRA on lm_head (which TRL's own head cannot train, so its constructor refuses it; fastft's head applies it)."""
    without_head = ("q_proj", "v_proj")
    dpo = DPOTrainer(model=lora_model(without_head), args=DPOConfig(**COMMON, max_length=32, beta=0.2),
                     train_dataset=preference_dataset(), processing_class=tokenizer())
    grpo = GRPOTrainer(model=lora_model(without_head), reward_funcs=lambda completions, **_: [0.0] * len(completions),
                       args=GRPOConfig(**COMMON, num_generations=2, max_completion_length=8, beta=0.04,
                                       temperature=0.7), train_dataset=text_dataset(), processing_class=tokenizer())
    grpo.current_gradient_accumulation_steps = 1  # what Trainer.training_step sets
    return {trainer: {key: trl_head_options(trainer.model.get_base_model())[key] for key in ("temperature", "outputs")}
            for trainer in (dpo, grpo)}


def trainer_model(head_options):
    """A fresh lora_model() with TRL's fused head, as the trainers' constructors give their model."""
    model = lora_model()
    add_fused_lm_head(model.get_base_model(), **head_options)
    return model


def grpo_batch(trainer, head_options, rank):
    """A GRPO batch of rank `rank`: completions, advantages, and old / reference log-probs near the initial model's."""
    g = torch.Generator().manual_seed(10 + rank)
    prompt_ids, completion_ids = torch.randint(3, 200, (2, 5), generator=g), torch.randint(3, 200, (2, 7), generator=g)
    completion_mask = torch.ones(2, 7, dtype=torch.long)
    completion_mask[1, 4:] = 0
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer_model(head_options), torch.cat([prompt_ids, completion_ids], 1),
            torch.cat([torch.ones_like(prompt_ids), completion_mask], 1), 7)
    return {"prompt_ids": prompt_ids, "prompt_mask": torch.ones_like(prompt_ids), "completion_ids": completion_ids,
            "completion_mask": completion_mask, "advantages": torch.randn(2, generator=g),
            "old_per_token_logps": logps + 0.05 * torch.randn(logps.shape, generator=g),
            "ref_per_token_logps": logps + 0.1 * torch.randn(logps.shape, generator=g),
            "num_items_in_batch": completion_mask.sum().float()}


@functools.cache
def batch(case, rank):
    if case == "dpo-trainer":
        dpo = list(trainers())[0]
        return dpo.data_collator([dpo.train_dataset[i] for i in (2 * rank, 2 * rank + 1)])
    if case == "grpo-trainer":
        return grpo_batch(*list(trainers().items())[1], rank)
    ids = torch.randint(3, 200, (4, 12), generator=torch.Generator().manual_seed(20 + rank))
    labels = ids.clone()
    labels[:, :5] = -100
    return {"input_ids": ids, "labels": labels}


@functools.cache
def teacher():
    torch.manual_seed(1)
    return tiny_llama(1).eval().requires_grad_(False)


def model_for(case, distillation_teacher=None):
    """(model, loss function of a batch) of one case, identically initialised in every process; the distillation
    case's teacher is `distillation_teacher` (default: teacher(), whole)."""
    if case in ("dpo-trainer", "grpo-trainer"):
        trainer, head_options = list(trainers().items())[case == "grpo-trainer"]
        trainer.model = trainer_model(head_options)
        assert fastft.patch(trainer).fused_heads == 1
        compute = trainer.compute_loss if case == "dpo-trainer" else trainer._compute_loss
        return trainer.model, lambda model, inputs: compute(model, copy.copy(inputs))
    if case == "fused-loss":
        model = lora_model()
        fastft.patch(model, fused_loss=True)
        return model, lambda model, inputs: model(**inputs).loss
    if case == "fused-loss-4bit-head":  # QLoRA with the head quantized too: fastft's NF4 storage, sharded by FSDP2
        model = fastft.quantize_model(tiny_llama(0), blocksize=32, skip=())
        assert isinstance(model.lm_head, fastft.nn.NF4Linear)
        model = get_peft_model(model, fastft.lora_config_for_nf4(
            LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"], init_lora_weights=False)))
        fastft.patch(model, fused_loss=True)
        return model, lambda model, inputs: model(**inputs).loss
    if case == "fused-loss-bnb-4bit-head":  # the same on bitsandbytes' storage (fp32 codes, as FSDP-QLoRA loads them)
        model = bitsandbytes_llama(dense=tiny_llama(0), skip_modules=[])  # lm_head quantized too
        assert type(model.lm_head).__name__ == "Linear4bit"
        model = get_peft_model(model, LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"], init_lora_weights=False))
        fastft.patch(model, fused_loss=True)
        return model, lambda model, inputs: model(**inputs).loss
    if case == "distillation":
        from fastft.methods.distillation import distillation_loss

        model = lora_model()
        fastft.patch(model)
        return model, lambda model, inputs: distillation_loss(model, distillation_teacher or teacher(), inputs,
                                                              beta=0.5, temperature=2.0, alpha=0.5)
    model = tiny_llama(0)  # fused_linear_logprobs on the model's own head, whole model trained: a DPO-style loss
    return model, logprobs_op_loss


def logprobs_op_loss(model, inputs):
    """The op called directly on the last hidden states and the head's weight, gathered first under FSDP2 (the
    head's unshard(); its gradient is then reduce-scattered by the root's post-backward)."""
    labels = inputs["labels"]
    hidden = model(input_ids=inputs["input_ids"], output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
    head = (model.module if isinstance(model, DistributedDataParallel) else model).get_output_embeddings()
    if hasattr(head, "unshard"):
        head.unshard()
    logps = fused_linear_logprobs(hidden[:, :-1], head.weight, labels[:, 1:]).sum(-1)
    chosen, rejected = logps.chunk(2)
    return -F.logsigmoid(0.1 * (chosen - rejected)).mean()


def head_is_sharded(model):
    """Whether FSDP2 holds the head's parameters as shards (DTensors): its gathered copy freed."""
    from torch.distributed.tensor import DTensor

    return all(isinstance(param, DTensor) for param in model.get_output_embeddings().parameters())


def train(model, loss_fn, case, ranks, no_grad_passes=None):
    """Losses of STEPS SGD steps, each the mean over `ranks` of their batches' losses (see test_distributed.train).
    With `no_grad_passes` ({"resharded": [], "kept": []}), each step also computes the loss under torch.no_grad (as
    a reference, old-policy or eval pass would) before its forward, appending to "resharded" whether the head
    (sharded on its own) is sharded after it, and again between its forward and backward, appending to "kept"
    whether the head is still gathered for that backward (on the distillation case, whose loss runs the student's
    whole forward, lm_head's included (logits_to_keep=1), FSDP2 reshards it after that forward: the backward
    gathers it again)."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    losses = []
    for _ in range(STEPS):
        total = 0.0
        for rank in ranks:
            if no_grad_passes is not None:
                with torch.no_grad():
                    loss_fn(model, batch(case, rank))
                no_grad_passes["resharded"].append(head_is_sharded(model))
            loss = loss_fn(model, batch(case, rank))
            if no_grad_passes is not None:
                with torch.no_grad():
                    loss_fn(model, batch(case, rank))
                no_grad_passes["kept"].append(not head_is_sharded(model))
            (loss / WORLD if len(ranks) > 1 else loss).backward()
            total = total + loss.detach() / len(ranks)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(total)
    return torch.stack(losses)


def sharded_weight_refusal(model):
    """The error fused_linear_logprobs raises when handed a head shard (a DTensor) instead of the gathered weight."""
    head = model.get_output_embeddings()
    head.reshard()
    try:
        fused_linear_logprobs(torch.randn(3, 64), head.weight, torch.zeros(3, dtype=torch.long))
    except ValueError as error:
        return str(error)
    return None


def shard(model, head_apart):
    """FSDP2's fully_shard per decoder layer, on lm_head alone if `head_apart`, and on the root."""
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(model):
        fully_shard(layer)
    if head_apart:
        fully_shard(model.get_output_embeddings())
    return fully_shard(model)


def _worker(rank, port, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        results = {}
        for layout in LAYOUTS:
            for case in CASES:
                # with the head sharded on its own, the teacher too: its head is read under torch.no_grad
                sharded_teacher = (shard(copy.deepcopy(teacher()), head_apart=True)
                                   if (layout, case) == ("fsdp2-head", "distillation") else None)
                model, loss_fn = model_for(case, sharded_teacher)
                model = DistributedDataParallel(model) if layout == "ddp" else shard(model, layout == "fsdp2-head")
                # the head sharded on its own and read through fastft's head_weight (logprobs-op unshards it itself)
                no_grad_passes = ({"resharded": [], "kept": []} if layout == "fsdp2-head" and case != "logprobs-op"
                                  else None)
                losses = train(model, loss_fn, case, [rank], no_grad_passes)
                dist.all_reduce(losses)
                if sharded_teacher is not None:  # resharded after each read, yet its copy served the backwards
                    no_grad_passes["teacher resharded"] = [head_is_sharded(sharded_teacher)]
                results[layout, case] = {"losses": losses / WORLD, "weights": trained_weights(model),
                                         "no_grad_passes": no_grad_passes}
        results["refusal"] = sharded_weight_refusal(model)
        torch.save(results, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("head-losses") / "result")
    mp.spawn(_worker, args=(free_port(), out), nprocs=WORLD, join=True)
    return [torch.load(f"{out}.{rank}") for rank in range(WORLD)]


@functools.cache
def single_process_run(case):
    model, loss_fn = model_for(case)
    return train(model, loss_fn, case, range(WORLD)), trained_weights(model)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES)
def test_fused_head_losses_under_ddp_and_fsdp2_match_one_process(distributed_run, case, layout):
    losses, expected = single_process_run(case)
    assert any("lm_head" in name for name in expected)  # the head trains
    for results in distributed_run:
        result = results[layout, case]
        assert torch.allclose(result["losses"], losses, rtol=1e-5, atol=0), (result["losses"], losses)
        assert result["weights"].keys() == expected.keys()
        for name, weight in result["weights"].items():
            assert (weight - expected[name]).norm() <= 1e-5 * expected[name].norm(), name
        passes = result["no_grad_passes"]
        if passes is not None:  # the no-grad passes resharded the head, or kept it gathered for the backward to come
            assert len(passes["resharded"]) == STEPS and all(passes["resharded"]), passes
            kept = case != "distillation"  # not when the no-grad pass ran the head's own forward (FSDP2 reshards it)
            assert passes["kept"] == [kept] * STEPS, passes
            if case == "distillation":  # and the sharded teacher's head
                assert passes["teacher resharded"] == [True], passes


def test_a_head_shard_is_refused_with_a_clear_error(distributed_run):
    for results in distributed_run:
        assert results["refusal"] is not None and "sharded DTensor" in results["refusal"], results["refusal"]
