"""Under DDP (gloo, 2 processes on 127.0.0.1), the gradients of a DPO loss on fastft's fused head (TRL's fused-head
contract, fastft::fused_linear_logprobs underneath) reach DDP's all-reduce: every rank ends with the mean of the
ranks' single-process gradients (Liger's fused DPO loss skips the sync: trl#7245). Both ways the head is installed:
in place of TRL's (DPO, GRPO, KTO, ...) and on a model without one (ORPO / CPO, fastft/integrations/trl_pairwise.py).
A whole patched ORPOTrainer launched by torchrun on 2 processes trains as in one process (orpo_under_torchrun.py;
CPOTrainer takes the same patched path)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch.nn.parallel import DistributedDataParallel
from trl.trainer.utils import add_fused_lm_head

import fastft
from conftest import rel_error
from fastft.integrations.trl import install_head, patch_trl_head
from trl_fixtures import tiny_llama

WORLD, PAIRS, TOKENS, PROMPT = 2, 2, 12, 5
pytestmark = pytest.mark.slow


def model(head="trl"):
    peft_model = get_peft_model(tiny_llama(0), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                          init_lora_weights=False))
    base = peft_model.get_base_model()
    if head == "trl":
        add_fused_lm_head(base, outputs=("log_probs",))
        assert patch_trl_head(base) == "fastft::fused_linear_logprobs"
    else:  # what patch(trainer) installs for ORPOTrainer / CPOTrainer
        install_head(base, {"temperature": 1.0, "logit_scale": 1.0, "outputs": {"log_probs", "mean_logits"},
                            "backbone_attr": base.base_model_prefix})
    fastft.patch(peft_model)
    return peft_model


def batch(rank):
    g = torch.Generator().manual_seed(100 + rank)
    ids = torch.randint(3, 200, (2 * PAIRS, TOKENS), generator=g)
    labels = ids.clone()
    labels[:, :PROMPT] = -100
    return ids, labels, torch.randn(2 * PAIRS, generator=g)  # [chosen; rejected], reference log-probs


def dpo_grads(net, ids, labels, ref, beta=0.1):
    logps = net(input_ids=ids, labels=labels, fused_lm_head=True).log_probs.sum(-1)
    chosen, rejected = (logps - ref).chunk(2)
    (-F.logsigmoid(beta * (chosen - rejected)).mean()).backward()
    module = net.module if isinstance(net, DistributedDataParallel) else net
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}


HEADS = ("trl", "pairwise")


def _worker(rank, port, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        for head in HEADS:
            torch.save(dpo_grads(DistributedDataParallel(model(head)), *batch(rank)), f"{out}/{head}{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_fused_dpo_gradients_are_all_reduced(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, str(tmp_path)), nprocs=WORLD, join=True)
    for head in HEADS:
        local = [dpo_grads(model(head), *batch(rank)) for rank in range(WORLD)]
        for rank in range(WORLD):
            synced = torch.load(tmp_path / f"{head}{rank}.pt")
            assert synced.keys() == local[0].keys() and len(synced) == 8
            for name, grad in synced.items():
                mean = (local[0][name] + local[1][name]) / 2
                assert rel_error(grad, mean) < 1e-5, (head, name)
                assert rel_error(grad, local[rank][name]) > 1e-3  # not the rank's own gradient


def test_patched_orpo_trainer_under_torchrun_trains_as_one_process(tmp_path):
    """3 ORPO steps with fastft.patch(trainer): 2 DDP processes of 1 pair each vs 1 process of 2 pairs (equal token
    counts): the same logged losses and trained LoRA weights (1e-5), the same weights on both ranks."""
    here = Path(__file__).parent
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(here), str(here.parent)])}
    for world in (1, WORLD):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        command = [torchrun, "--nnodes=1", f"--nproc_per_node={world}", "--master_addr=127.0.0.1",
                   f"--master_port={port}", "orpo_under_torchrun.py", "orpo", str(tmp_path)]
        result = subprocess.run(command, cwd=here, capture_output=True, text=True, timeout=300, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
    alone = torch.load(tmp_path / "orpo-world1-rank0.pt")
    ranks = [torch.load(tmp_path / f"orpo-world{WORLD}-rank{rank}.pt") for rank in range(WORLD)]
    initial = dict(model("pairwise").named_parameters())
    assert len(alone["losses"]) == 3 and len(alone["weights"]) == 8
    for rank in ranks:
        assert all(abs(a - b) <= 1e-5 * abs(a) for a, b in zip(rank["losses"], alone["losses"], strict=True))
        for name, weight in alone["weights"].items():
            assert rel_error(rank["weights"][name], weight) < 1e-5, name
            assert torch.equal(rank["weights"][name], ranks[0]["weights"][name]), name
            assert not torch.equal(weight, initial[name].detach()), name  # trained
