"""LoRA and QLoRA training steps of a mini Llama under FSDP2 on 2 CPU processes (gloo, 127.0.0.1), fastft vs
plain peft (+ bitsandbytes): time per step and peak RSS per rank, and the bytes FSDP2 all-gathers per step (rank
0's received buffers) for a bf16 model whose decoder linears are in fastft's 4-bit storage vs all bf16.

The model: 4 layers, hidden 512, intermediate 1408, 8 heads, vocab 8192; each rank trains on 2 x 256 tokens; LoRA
r=16 on all seven projections; `fully_shard` on every decoder layer and on the root. Each case is one torchrun
launch of 2 processes:

    torchrun --nproc_per_node=2 -m fastft.bench.distributed --case qlora-fastft --out result.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time

import torch

from fastft.bench.harness import Machine, Row

CASES = {  # case: (base, fastft patched?)
    "lora-peft": ("fp32", False), "lora-fastft": ("fp32", True),
    "qlora-peft": ("bnb-4bit", False), "qlora-fastft": ("bnb-4bit", True),
    "bf16-base-fastft": ("bf16", True), "nf4-base-fastft": ("fastft-nf4", True),
}
WORLD, TOKENS, VOCAB = 2, 256, 8192


def _model(base: str):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    import fastft

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=TOKENS)
    model = LlamaForCausalLM(config)
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")
    if base == "bf16":
        model = model.to(torch.bfloat16)
    elif base == "fastft-nf4":  # the bf16 model with its decoder linears in fastft's 4-bit storage
        model = fastft.quantize_model(model.to(torch.bfloat16))
        lora = fastft.lora_config_for_nf4(lora, model)
    elif base == "bnb-4bit":  # as FSDP-QLoRA recipes load it: the codes stored in a float dtype FSDP can shard
        from safetensors.torch import save_file

        with tempfile.TemporaryDirectory() as folder:  # written by every rank (save_pretrained: rank 0 only)
            model.config.save_pretrained(folder)
            save_file(model.state_dict(), os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
            quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32,
                                              bnb_4bit_quant_storage=torch.float32)
            model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quantization, dtype=torch.float32)
    return get_peft_model(model, lora).train()  # from_pretrained returns eval mode


def _counting_all_gather():
    """FSDP2's default all-gather, counting the bytes each call brings to this rank (its output buffer)."""
    from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllGather

    class CountingAllGather(DefaultAllGather):
        bytes = 0

        def __call__(self, output_tensor, input_tensor, group, async_op=False):
            self.bytes += output_tensor.numel() * output_tensor.element_size()
            return super().__call__(output_tensor, input_tensor, group, async_op)

    return CountingAllGather()


def run_rank(case: str, steps: int) -> dict:
    """One rank of a case (under torchrun): median step time, peak RSS, all-gather bytes per step."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    import fastft

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        base, patched = CASES[case]
        model = _model(base)
        if patched:
            fastft.patch(model, fused_loss=True)
        layers = next(module for name, module in model.named_modules() if name.endswith("model.layers"))
        # the layers' trainable (LoRA, fp32) weights: all-gathered in forward and again in backward
        lora_bytes = 2 * sum(p.numel() * p.element_size() for p in layers.parameters() if p.requires_grad)
        layer_gathers, root_gather = _counting_all_gather(), _counting_all_gather()
        for layer in layers:
            fully_shard(layer).set_custom_all_gather(layer_gathers)
        fully_shard(model).set_custom_all_gather(root_gather)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        ids = torch.randint(0, VOCAB, (2, TOKENS), generator=torch.Generator().manual_seed(dist.get_rank()))
        times, gathered = [], []
        for step in range(steps + 1):  # the first step warms up
            dist.barrier()
            before, start = (layer_gathers.bytes, root_gather.bytes), time.perf_counter()
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step:
                times.append(time.perf_counter() - start)
                gathered.append((layer_gathers.bytes - before[0], root_gather.bytes - before[1]))
        return {"step_ms": sorted(times)[len(times) // 2] * 1e3, "layers_allgather_mib": gathered[-1][0] / 2**20,
                "allgather_mib": sum(gathered[-1]) / 2**20, "lora_allgather_mib": lora_bytes / 2**20,
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(case: str, steps: int) -> dict:
    """One case on WORLD processes; the slowest rank's step time, the largest RSS, rank 0's all-gather bytes."""
    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={WORLD}",
                   "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "fastft.bench.distributed",
                   "--case", case, "--steps", str(steps), "--out", folder]
        result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if result.returncode:
            raise RuntimeError(f"case {case} failed (exit {result.returncode}):\n{result.stderr[-4000:]}")
        ranks = [json.loads(open(os.path.join(folder, f"rank{r}.json")).read()) for r in range(WORLD)]
    return {"step_ms": max(r["step_ms"] for r in ranks), "peak_rss_mib": max(r["peak_rss_mib"] for r in ranks),
            "allgather_mib": ranks[0]["allgather_mib"], "layers_allgather_mib": ranks[0]["layers_allgather_mib"],
            "lora_allgather_mib": ranks[0]["lora_allgather_mib"]}


def run(machine: Machine, steps: int = 3, progress=print) -> list[Row]:
    measured = {}
    for case in CASES:
        progress(f"FSDP2 on {WORLD} processes: {case}")
        measured[case] = launch(case, steps)
    rows = []
    for name, peer, ours in (("LoRA, fp32 base", "lora-peft", "lora-fastft"),
                             ("QLoRA, bitsandbytes 4-bit base", "qlora-peft", "qlora-fastft")):
        o, p = measured[ours], measured[peer]
        row = Row(f"FSDP2 x{WORLD} {name} step (peak RSS/rank {o['peak_rss_mib']:.0f} vs {p['peak_rss_mib']:.0f} MiB;"
                  f" all-gather {o['allgather_mib']:.1f} vs {p['allgather_mib']:.1f} MiB/step)", o["step_ms"],
                  "peft" + (" + bitsandbytes" if "qlora" in peer else ""), p["step_ms"], target="faster, less RSS")
        row.met = row.speedup >= 1.0 and o["peak_rss_mib"] <= p["peak_rss_mib"]
        rows.append(row)
    nf4, bf16 = measured["nf4-base-fastft"], measured["bf16-base-fastft"]
    base = {case: m["layers_allgather_mib"] - m["lora_allgather_mib"] for case, m in (("nf4", nf4), ("bf16", bf16))}
    ratio = base["nf4"] / base["bf16"]
    row = Row(f"FSDP2 x{WORLD} all-gather per step, bf16 model with fastft 4-bit vs bf16 decoder linears: their base "
              f"weights {base['nf4']:.1f} vs {base['bf16']:.1f} MiB = {ratio:.2f}x; decoder layers with LoRA "
              f"{nf4['layers_allgather_mib']:.1f} vs {bf16['layers_allgather_mib']:.1f} MiB, whole model "
              f"{nf4['allgather_mib']:.1f} vs {bf16['allgather_mib']:.1f} MiB (embeddings and head stay bf16); step ms",
              nf4["step_ms"], "fastft, bf16 base", bf16["step_ms"], target="base weights' all-gather <= 0.3x")
    row.met = ratio <= 0.3
    rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--case", choices=sorted(CASES), required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", required=True, help="folder for rank<R>.json")
    args = parser.parse_args(argv)
    result = run_rank(args.case, args.steps)
    with open(os.path.join(args.out, f"rank{os.environ['RANK']}.json"), "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
