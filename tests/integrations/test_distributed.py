"""fastft under torch.distributed (gloo, 2 processes on 127.0.0.1): DDP and FSDP2 (`fully_shard` per decoder layer
and on the root) give the single-process run's losses and trained weights on the same global batch, and DDP
leaves the same gradients on every rank, for each fused path, also with activation checkpointing (HF's or torch's
checkpoint_wrapper). One pair of processes per wrapper runs every path."""

import collections
import datetime
import functools
import os
import socket
import subprocess
import sys
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from peft import LoraConfig, PeftModel, get_peft_model
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

import fastft
from conftest import bnb_standard_layout

VOCAB, WORLD, STEPS = 128, 2, 5
PATHS = ("lora", "lora-fused-loss", "lora-checkpointed", "lora-checkpoint-wrapper", "dora", "dora-checkpointed",
         "qlora-nf4",
         "qlora-nf4-checkpoint-wrapper", "qlora-bnb", "qlora-bnb-checkpointed", "qlora-bnb-bf16-storage", "adapters",
         "adapters-checkpointed", "qat", "qat-checkpoint-wrapper", "distillation", "distillation-checkpointed",
         "lora-bf16-params", "qlora-nf4-bf16-params", "qlora-nf4-bf16-params-checkpoint-wrapper")
FUSED_LOSS = ("lora-fused-loss", "qlora-nf4", "qlora-bnb", "qlora-bnb-bf16-storage")  # fastft.patch(fused_loss=True)
SAVED = ("lora", "dora")  # paths whose FSDP2 checkpoint is loaded back in one process with plain peft
# Activation checkpointing of every decoder layer, HF's ("-checkpointed": gradient_checkpointing_enable, as Trainer
# calls it, after fastft.patch) or torch's ("-checkpoint-wrapper": checkpoint_wrapper, as FSDP2 recipes apply it,
# before fully_shard). Its single-process counterpart is the path without checkpointing: the recomputed forward
# must give the same losses and weights (1e-5).
CHECKPOINTED = {"lora-checkpointed": "lora-fused-loss", "lora-checkpoint-wrapper": "lora-fused-loss",
                "dora-checkpointed": "dora", "qlora-nf4-bf16-params-checkpoint-wrapper": "qlora-nf4-bf16-params",
                "qlora-nf4-checkpoint-wrapper": "qlora-nf4", "qlora-bnb-checkpointed": "qlora-bnb",
                "adapters-checkpointed": "adapters", "qat-checkpoint-wrapper": "qat",
                "distillation-checkpointed": "distillation"}
# FSDP2's MixedPrecisionPolicy: bf16 parameters in forward and backward, gradients reduced and kept in fp32 (the
# 4-bit codes stay uint8). Its single-process counterpart is the path's fp32 run: bf16 rounding (2^-9 relative per
# operation, a few hundred accumulated over the steps' matmuls) bounds the difference.
MIXED_PRECISION = {"lora-bf16-params": "lora", "qlora-nf4-bf16-params": "qlora-nf4",
                   "qlora-nf4-bf16-params-checkpoint-wrapper": "qlora-nf4"}
BF16_TOLERANCE = 3e-2
# The single-process run a path is compared with: for a mixed-precision path with checkpointing, the fp32 run
# without either (its checkpointing is checked against the same run's mixed-precision path without it).
COUNTERPART = {**CHECKPOINTED, **MIXED_PRECISION}
pytestmark = pytest.mark.slow


def small_llama(intermediate_size=96):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=intermediate_size,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=64))


def bitsandbytes_llama(storage=torch.float32, dense=None, skip_modules=None):
    """`dense` (default: small_llama with K multiples of 64, see test_qlora_patch.py) loaded in 4 bits by
    transformers + bitsandbytes as FSDP-QLoRA recipes load it: the 4-bit codes held in a float dtype
    (`bnb_4bit_quant_storage`: the model's, or bf16 as most recipes), so that FSDP shards them with the other
    parameters. skip_modules: bitsandbytes' llm_int8_skip_modules (None: transformers' default, lm_head kept
    dense; [] quantizes lm_head too)."""
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        # written by every rank (save_pretrained writes on rank 0 only once a process group exists)
        dense = small_llama(intermediate_size=128) if dense is None else dense
        dense.config.save_pretrained(tmp)
        save_file(dense.state_dict(), os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=storage,
                                          llm_int8_skip_modules=skip_modules)
        model = AutoModelForCausalLM.from_pretrained(tmp, quantization_config=quantization, dtype=torch.float32)
    torch.manual_seed(0)
    return bnb_standard_layout(model).train()  # from_pretrained returns eval mode; the fused loss is training's


@functools.cache
def teacher_llama():
    """The frozen teacher of the "distillation" path: a plain model outside DDP / FSDP2, as users hold it."""
    torch.manual_seed(1)
    return LlamaForCausalLM(small_llama().config).eval().requires_grad_(False)


def lora_config(path):
    return LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False,
                      use_dora=path == "dora")


def model_for(path):
    """The model of one fastft path, identically initialised in every process."""
    model = base_model_for(COUNTERPART.get(path, path))
    if path.endswith("-checkpointed"):  # HF's activation checkpointing of every decoder layer
        transformers_model = model.get_base_model() if hasattr(model, "get_base_model") else model
        transformers_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif path.endswith("-checkpoint-wrapper"):  # torch's checkpoint_wrapper around every decoder layer
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

        apply_activation_checkpointing(model, check_fn=lambda module: type(module).__name__ == "LlamaDecoderLayer")
    return model


def base_model_for(path):
    """model_for(path) of a path without checkpointing or mixed precision."""
    model = small_llama()
    lora = lora_config(path)
    if path in ("lora", "lora-fused-loss", "dora", "distillation"):
        model = get_peft_model(model, lora)
        fastft.patch(model, fused_loss=path == "lora-fused-loss")
    elif path == "qlora-nf4":
        model = fastft.quantize_model(model, blocksize=32)
        model = get_peft_model(model, fastft.lora_config_for_nf4(lora, model))
        fastft.patch(model, fused_loss=True)
    elif path in ("qlora-bnb", "qlora-bnb-bf16-storage"):
        storage = torch.bfloat16 if path == "qlora-bnb-bf16-storage" else torch.float32
        model = get_peft_model(bitsandbytes_llama(storage), lora)
        assert fastft.patch(model, fused_loss=True).fused["lora.Linear4bit"] == 14
    elif path == "adapters":
        from fastft.adapters import AdapterConfig, add_adapters

        for param in model.parameters():
            param.requires_grad_(False)
        add_adapters(model, AdapterConfig(bottleneck_size=16, init="default"))
    elif path == "qat":
        from fastft.qat import prepare

        prepare(model, weight_bits=4, group_size=32, activation_bits=8)
    else:
        raise ValueError(path)
    return model


def decoder_layers(model):
    return next(module for name, module in model.named_modules() if name.endswith("model.layers"))


def global_batch(step):
    generator = torch.Generator().manual_seed(step)
    return torch.randint(0, VOCAB, (2 * WORLD, 12), generator=generator)


def rank_rows(rank):
    return slice(2 * rank, 2 * rank + 2)


def loss_of(model, path, ids):
    """The training loss of one batch: the model's causal-LM loss, or on the "distillation" paths fastft's fused
    distillation loss against teacher_llama() (the loss reads the student's lm_head weight outside its forward)."""
    if COUNTERPART.get(path, path) != "distillation":
        return model(input_ids=ids, labels=ids).loss
    from fastft.methods.distillation import distillation_loss

    return distillation_loss(model, teacher_llama(), {"input_ids": ids}, beta=0.5, temperature=2.0, alpha=0.5)


def train(model, path, ranks, on_backward=None):
    """Per step, the mean over `ranks` of their losses on their rows of the step's global batch, each rank's loss
    backpropagated divided by the world size (one rank per process under DDP / FSDP2, which average the gradients;
    every rank in turn in one process: the same sums); `on_backward(params)` after each step's backward."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.1)
    losses = []
    for step in range(STEPS):
        total = 0.0
        for rank in ranks:
            ids = global_batch(step)[rank_rows(rank)]
            loss = loss_of(model, path, ids)
            (loss / WORLD if len(ranks) > 1 else loss).backward()
            total = total + loss.detach() / len(ranks)
        if on_backward is not None:
            on_backward(params)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(total)
    return torch.stack(losses)


def trained_weights(model):
    """Trainable weights by name, unwrapped (DDP's module, checkpoint_wrapper's wrapped module: the names of its
    state dict) and whole (FSDP2's DTensor shards gathered)."""
    full = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            data = param.detach()
            data = data.full_tensor() if hasattr(data, "full_tensor") else data
            full[name.removeprefix("module.").replace("_checkpoint_wrapped_module.", "")] = data.clone()
    return full


def input_groups(model):
    """Whether each fastft input group (q/k/v, gate/up siblings sharing one fastft::lora_down) still groups."""
    groups = (module.__dict__.get("_fastft_input_group") for module in model.modules())
    return {group.name: group.active for group in groups if group is not None}


def fastft_ops_run(fn):
    """fn() under the profiler; how many times it ran each fastft op, by name."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        fn()
    return collections.Counter(event.name for event in profile.events() if event.name.startswith("fastft::"))


def _worker(rank, port, wrapper, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        results = {}
        for path in PATHS:
            if wrapper == "ddp" and path in MIXED_PRECISION:
                continue
            model = model_for(path)
            if wrapper == "ddp":
                model = torch.nn.parallel.DistributedDataParallel(model)
            else:
                from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

                policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
                    if path in MIXED_PRECISION else MixedPrecisionPolicy()
                for layer in decoder_layers(model):
                    fully_shard(layer, mp_policy=policy)
                fully_shard(model, mp_policy=policy)
            grads = []
            ops = fastft_ops_run(lambda: results.setdefault(path, {}).update(
                losses=train(model, path, [rank], lambda params: grads.append([p.grad.clone() for p in params]))))
            losses = results[path]["losses"]
            dist.all_reduce(losses)
            results[path].update(losses=losses / WORLD, weights=trained_weights(model), grads=grads, ops=ops,
                                 groups=input_groups(model))
            if wrapper == "fsdp2" and path in SAVED:  # the adapter as peft saves it, from the gathered state dict
                from torch.distributed.checkpoint.state_dict import StateDictOptions

                state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
                results[path]["adapter"] = f"{out}.{path}"
                model.save_pretrained(results[path]["adapter"], state_dict=state, is_main_process=rank == 0)
                # and the sharded training checkpoint (torch.distributed.checkpoint, each rank writing its shards)
                results[path]["sharded"] = f"{out}.{path}.dcp"
                dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=results[path]["sharded"])
        torch.save(results, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


# where a fresh interpreter finds this module and the tests' conftest
HELPER_PATH = os.pathsep.join([os.path.dirname(__file__), os.path.dirname(os.path.dirname(__file__))])


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=("ddp", "fsdp2"))
def distributed_run(request, tmp_path_factory):
    out = str(tmp_path_factory.mktemp(request.param) / "result")
    mp.spawn(_worker, args=(free_port(), request.param, out), nprocs=WORLD, join=True)
    return request.param, [torch.load(f"{out}.{rank}") for rank in range(WORLD)]


@functools.cache
def single_process_run(path):
    """(fastft ops run, losses, trained weights, input groups) of `path` trained in this process on every rank's
    rows in turn."""
    model, run = model_for(path), {}
    ops = fastft_ops_run(lambda: run.update(losses=train(model, path, range(WORLD))))
    return ops, run["losses"], trained_weights(model), input_groups(model)


@pytest.mark.parametrize("path", PATHS)
def test_distributed_training_matches_one_process(distributed_run, path):
    wrapper, results = distributed_run
    if wrapper == "ddp" and path in MIXED_PRECISION:
        pytest.skip("MixedPrecisionPolicy is FSDP2's: these paths have no DDP run")
    ops, losses, expected, groups = single_process_run(COUNTERPART.get(path, path))
    tolerance = BF16_TOLERANCE if path in MIXED_PRECISION else 1e-5
    for rank_results in results:
        result = rank_results[path]
        assert result["ops"].keys() == ops.keys() and ops, (result["ops"], ops)  # the same fused ops ran
        if COUNTERPART.get(path, path) in FUSED_LOSS:  # the fused loss among them (models in training mode)
            assert "fastft::fused_linear_nll" in ops, ops
        if path in CHECKPOINTED:  # and the decoder layers' ones ran again in backward (recomputed)
            without = rank_results[CHECKPOINTED[path]]["ops"]
            assert result["ops"].total() > without.total(), (result["ops"], without)
        assert result["groups"] == groups and all(groups.values()), result["groups"]  # input groups kept grouping
        assert torch.allclose(result["losses"], losses, rtol=tolerance, atol=0), (result["losses"], losses)
        if path in MIXED_PRECISION:  # and the forward did run in bf16
            assert not torch.allclose(result["losses"], losses, rtol=1e-5, atol=0), (result["losses"], losses)
        assert result["weights"].keys() == expected.keys()
        for name, weight in result["weights"].items():
            assert weight.dtype == expected[name].dtype, name  # fp32 weights (and gradients) under mixed precision
            assert (weight - expected[name]).norm() <= tolerance * expected[name].norm(), name
    if wrapper == "fsdp2" and path in SAVED:  # the checkpoint saved under FSDP2 loads in one process, plain peft
        loaded = PeftModel.from_pretrained(small_llama(), results[0][path]["adapter"])
        for name, param in loaded.named_parameters():
            if name in expected:
                assert (param - expected[name]).norm() <= 1e-5 * expected[name].norm(), name
        assert sum(name in expected for name, _ in loaded.named_parameters()) == len(expected)
        # and the sharded checkpoint loads into a plain peft model in one process: the weights trained under FSDP2
        plain = get_peft_model(small_llama(), lora_config(path))
        state = {"model": get_model_state_dict(plain)}
        dcp.load(state, checkpoint_id=results[0][path]["sharded"])
        set_model_state_dict(plain, state["model"])
        trained = {name: param for name, param in plain.named_parameters() if param.requires_grad}
        assert trained.keys() == results[0][path]["weights"].keys()
        for name, param in trained.items():
            assert torch.equal(param, results[0][path]["weights"][name]), name
    if wrapper == "ddp":  # every rank holds the same (averaged) gradients after each backward
        for step_grads in zip(results[0][path]["grads"], results[1][path]["grads"]):
            for g0, g1 in zip(*step_grads):
                assert torch.equal(g0, g1)


def _dying_worker(rank, port):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=20))
    model = torch.nn.parallel.DistributedDataParallel(model_for("lora-fused-loss"))
    ids = global_batch(0)[rank_rows(rank)]
    if rank == 1:
        os._exit(3)  # the rank dies mid-step, before its backward's all-reduce
    model(input_ids=ids, labels=ids).loss.backward()


def test_a_rank_dying_mid_step_ends_the_others_with_an_error():
    """Each rank its own process, so nothing kills the survivor for it: its backward's all-reduce fails (the peer's
    connection closed, or the 20 s timeout) instead of hanging."""
    port = free_port()
    code = f"import test_distributed as t; t._dying_worker({{rank}}, {port})"
    ranks = [subprocess.Popen([sys.executable, "-c", code.format(rank=rank)], cwd=os.path.dirname(__file__),
                              env={**os.environ, "PYTHONPATH": HELPER_PATH}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in range(WORLD)]
    start = time.monotonic()
    _, survivor_err = ranks[0].communicate(timeout=120)
    assert ranks[1].wait(timeout=30) == 3
    assert ranks[0].returncode != 0 and time.monotonic() - start < 60
    assert "Error" in survivor_err.splitlines()[-1], survivor_err[-2000:]


def test_hf_trainer_under_torchrun_trains_a_patched_model_and_saves_a_plain_peft_adapter(tmp_path):
    """torchrun with 2 processes (127.0.0.1) runs HF Trainer (DDP, gloo) on a fastft-patched peft model: the fused
    ops run, both ranks end with the same weights, and the adapter Trainer saves loads with plain peft."""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    command = [torchrun, "--nnodes=1", f"--nproc_per_node={WORLD}", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", "trainer_under_torchrun.py", str(tmp_path)]
    result = subprocess.run(command, cwd=os.path.dirname(__file__), capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": HELPER_PATH})
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]
    assert all(r["steps"] == 4 and "fastft::lora_down" in r["ops"] for r in ranks), [r["ops"] for r in ranks]
    assert ranks[0]["weights"].keys() == ranks[1]["weights"].keys()
    for name, weight in ranks[0]["weights"].items():
        assert torch.equal(weight, ranks[1]["weights"][name]), name
    loaded = PeftModel.from_pretrained(small_llama(), tmp_path / "adapter")
    trained = {name: param for name, param in loaded.named_parameters() if name in ranks[0]["weights"]}
    assert len(trained) == len(ranks[0]["weights"])
    initial = dict(model_for("lora").named_parameters())
    for name, param in trained.items():
        assert torch.equal(param, ranks[0]["weights"][name]), name
        assert not torch.equal(param, initial[name]), name  # trained
