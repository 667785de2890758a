"""`fastft bench --suite preference`: preference / RL losses from hidden states, fp32, CPU.

- DPO loss (sigmoid) fwd+bwd, 2 pairs x 1024 tokens, H=2048, V=32000, policy head trainable, reference
  log-probabilities from a frozen head under no_grad: fastft (fused_linear_logprobs + the loss on (batch,) sums) vs
  TRL's logits path (logits -> log_softmax -> gather, as TRL computed them before its fused head) vs Liger's
  LigerFusedLinearDPOLoss (eager: compiled=False).
- GRPO loss (loss_type "grpo", token-level ratios, clipping, KL to precomputed reference log-probs, beta 0.04)
  fwd+bwd, 8 completions x 512 tokens, same H and V: fastft vs TRL's logits path vs LigerFusedLinearGRPOLoss.
- KTO loss (2 desirable + 2 undesirable completions x 1024 tokens, reference log-probs from a frozen head, a
  precomputed KL estimate) and ORPO loss (2 pairs x 1024 tokens, odds ratio + NLL), same H and V: fastft vs TRL's
  logits path vs LigerFusedLinearKTOLoss / LigerFusedLinearORPOLoss.
fastft and TRL's logits path run the same loss code (fastft.methods: dpo_loss, grpo_loss, kto_loss, orpo_loss) on
log-probabilities from fused_linear_logprobs or from the logits; fastft's GRPO runs grpo_loss_from_hidden (the
head's gradients taken in the forward pass: GRPO's loss is token-local).
- The causal-LM cross-entropy on 2048 tokens of which 256 are labelled vs all labelled (V=49152, H=576): ignored
  rows are dropped before the head matmul.
Each loss case runs in its own process: time = best of the repeats (the first call included), memory = the largest
peak RSS above the inputs, gradient buffers included (the same for every implementation; glibc told to return freed
blocks at once). Whole training steps through TRL: fastft/bench/trl_step.py.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

from fastft.bench.harness import Machine, Row, compare_ms, peak_rss_above_now_mib

H, V = 2048, 32000
SHAPES = {"dpo": (4, 1024), "grpo": (8, 512), "kto": (4, 1024), "orpo": (4, 1024)}  # (sequences, tokens)
IMPLS = ("fastft", "trl", "liger")
# The floor of DPO without a (tokens, V) tensor: its head GEMMs alone, each at full size (one product of all tokens:
# no chunking is faster), 5 of them (the reference's forward; the policy's forward, its recompute in backward, d
# hidden, d W) against TRL's 4 (the same without the recompute: TRL keeps the logits).
FLOOR = "gemm-floor"
BETA = {"dpo": 0.1, "grpo": 0.04, "kto": 0.1, "orpo": 0.1}


def _inputs(kind: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    b, t = SHAPES[kind]
    hidden = (torch.randn(b, t, H, generator=g) * 0.5).requires_grad_()
    weight = (torch.randn(V, H, generator=g) * 0.02).requires_grad_()
    labels = torch.randint(0, V, (b, t), generator=g)
    ref_hidden = hidden.detach() + 0.01 * torch.randn(b, t, H, generator=g)
    ref_weight = weight.detach() + 0.001 * torch.randn(V, H, generator=g)
    extra = {"mask": torch.ones(b, t)}
    if kind == "kto":
        extra["desirable"] = torch.tensor([True, False] * (b // 2))
        extra["kl"] = torch.tensor(0.5)
    if kind == "grpo":
        with torch.no_grad():
            logps = _logits_logps(hidden, weight, labels)
        extra = {"old": logps + 0.01 * torch.randn(b, t, generator=g), "ref": logps + 0.05 * torch.randn(b, t, generator=g),
                 "advantages": torch.randn(b, generator=g), "mask": torch.ones(b, t)}
    return hidden, weight, labels, ref_hidden, ref_weight, extra


def _logits_logps(hidden, weight, labels):
    """TRL's logits path: (batch, tokens, V) logits, log_softmax, gather."""
    return torch.log_softmax(hidden @ weight.t(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def _loss_from_logps(kind: str, logps, ref_logps, extra, beta):
    """The loss of `kind` (fastft.methods) on per-token log-probabilities (and the reference's, or None)."""
    from fastft.methods.grpo import GRPOLossConfig, grpo_loss
    from fastft.methods.preference import DPOLossConfig, KTOLossConfig, dpo_loss, kto_loss
    from fastft.methods.reference_free import ORPOLossConfig, orpo_loss

    mask = extra["mask"]
    if kind == "dpo":
        return dpo_loss(logps, ref_logps, mask, DPOLossConfig(beta=beta))[0]
    if kind == "kto":
        kl = extra["kl"].expand(logps.shape[0])  # a precomputed KL estimate: kl_logps - ref_kl_logps
        return kto_loss(logps, ref_logps, extra["desirable"], KTOLossConfig(beta=beta), mask=mask, kl_logps=kl,
                        ref_kl_logps=torch.zeros_like(kl))[0]
    if kind == "orpo":
        return orpo_loss(logps, mask, ORPOLossConfig(beta=beta))[0]
    return grpo_loss(logps, mask, extra["advantages"], GRPOLossConfig(loss_type="grpo", beta=beta),
                     old_per_token_logps=extra["old"], ref_per_token_logps=extra["ref"])[0]


def loss_fn(kind: str, impl: str, inputs):
    """A closure computing the loss (fwd + bwd) of `kind` with `impl` on `inputs`."""
    hidden, weight, labels, ref_hidden, ref_weight, extra = inputs
    beta = BETA[kind]
    if impl == "liger":
        from liger_kernel import chunked_loss

        if kind == "dpo":
            loss = chunked_loss.LigerFusedLinearDPOLoss(beta=beta, compiled=False, use_ref_model=True)
            return lambda: loss(weight, hidden, labels, ref_input=ref_hidden, ref_weight=ref_weight)[0]
        if kind == "kto":
            loss = chunked_loss.LigerFusedLinearKTOLoss(beta=beta, compiled=False, use_ref_model=True)
            return lambda: loss(hidden, weight, labels, preference_labels=extra["desirable"], ref_input=ref_hidden,
                                ref_weight=ref_weight, kl=extra["kl"])[0]
        if kind == "orpo":
            loss = chunked_loss.LigerFusedLinearORPOLoss(beta=beta, compiled=False)
            return lambda: loss(weight, hidden, labels)[0]
        loss = chunked_loss.LigerFusedLinearGRPOLoss(beta=beta, compiled=False, loss_type="grpo")
        return lambda: loss(hidden, weight, labels, extra["mask"], extra["advantages"],
                            ref_per_token_logps=extra["ref"], old_per_token_logps=extra["old"])[0]
    if impl == "fastft" and kind == "grpo":  # token-local: the head's gradients taken in the forward pass
        from fastft.methods.grpo import GRPOLossConfig, grpo_loss_from_hidden

        return lambda: grpo_loss_from_hidden(hidden, weight, labels, extra["mask"], extra["advantages"],
                                             GRPOLossConfig(loss_type="grpo", beta=beta),
                                             old_per_token_logps=extra["old"], ref_per_token_logps=extra["ref"])[0]
    if impl == "fastft":
        from fastft.losses import fused_linear_logprobs

        logps_of = fused_linear_logprobs
    else:
        logps_of = _logits_logps

    def run():
        ref = None
        if kind in ("dpo", "kto"):
            with torch.no_grad():
                ref = logps_of(ref_hidden, ref_weight, labels)
        return _loss_from_logps(kind, logps_of(hidden, weight, labels), ref, extra, beta)
    return run


def _gemm_floor(inputs):
    """A callable running DPO's head GEMMs alone (FLOOR), returning a 0-d tensor with nothing to backpropagate."""
    hidden, weight, _, ref_hidden, ref_weight, _ = inputs
    h, ref_h = hidden.detach().reshape(-1, H), ref_hidden.reshape(-1, H)
    w, ref_w = weight.detach(), ref_weight

    def run():
        ref_h @ ref_w.t()  # the reference's forward
        h @ w.t()  # the policy's forward
        z = h @ w.t()  # recomputed in backward: stands for d(logits)
        z @ w  # d hidden
        z.t() @ h  # d weight
        return torch.zeros((), requires_grad=True)
    return run


def _measure(kind: str, impl: str, repeats: int) -> dict:
    """Best time (ms) and largest peak RSS above the inputs (MiB) over `repeats` fwd+bwd calls (the first one
    included: at these sizes one call takes tens of seconds on a 2-core CPU)."""
    import time

    inputs = _inputs(kind)
    fn = _gemm_floor(inputs) if impl == FLOOR else loss_fn(kind, impl, inputs)
    times, peaks = [], []

    def step():
        start = time.perf_counter()
        fn().backward()
        times.append(time.perf_counter() - start)

    for _ in range(repeats):
        inputs[0].grad = inputs[1].grad = None
        peaks.append(peak_rss_above_now_mib(step))
    return {"peak_mib": max(peaks), "ms": min(times) * 1e3}


def measure(kind: str, impl: str, repeats: int) -> dict:
    """_measure in a fresh process."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    command = [sys.executable, "-m", "fastft.bench.preference", "--kind", kind, "--impl", impl,
               "--repeats", str(repeats)]
    return json.loads(subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout)


def run_losses(machine: Machine, repeats: int = 2, progress=print, kinds=tuple(SHAPES)) -> list[Row]:
    rows = []
    targets = {("dpo", "trl"): (0.1, 1.0), ("dpo", "liger"): (0.5, 0.9), ("grpo", "trl"): (0.1, None),
               ("grpo", "liger"): (0.5, 0.9)}
    for kind in kinds:
        b, t = SHAPES[kind]
        progress(f"{kind} loss fwd+bwd, {b} x {t} tokens, H={H}, V={V} (one process per implementation)")
        results = {}
        for impl in IMPLS + ((FLOOR,) if kind == "dpo" else ()):
            results[impl] = measure(kind, impl, repeats)
            progress(f"  -> {impl}: {results[impl]}")
        ours = results["fastft"]
        if kind == "dpo":  # peer / floor: the most any implementation keeping no logits can gain over TRL here
            rows.append(Row(f"{kind} head GEMMs alone, 5 at full size (the floor without logits)",
                            results[FLOOR]["ms"], "TRL logits path", results["trl"]["ms"],
                            machine.gemm_ms(5 * 2 * b * t * H * V)))
        for peer in ("trl", "liger"):
            mem_target, time_target = targets.get((kind, peer), (None, None))
            name = "TRL logits path" if peer == "trl" else "Liger fused (eager)"
            # policy: logits, dz W, dz^T h, and the logits recomputed in backward unless taken in the forward
            gemms = (3 if kind == "grpo" else 4) * 2 * b * t * H * V
            row = Row(f"{kind} loss fwd+bwd, {b}x{t} tokens", ours["ms"], name, results[peer]["ms"],
                      machine.gemm_ms(gemms), target=f"time <= {time_target}x" if time_target else "")
            row.met = None if time_target is None else ours["ms"] <= time_target * results[peer]["ms"]
            rows.append(row)
            row = Row(f"{kind} loss peak MiB above inputs (value in the ms columns)", ours["peak_mib"], name,
                      results[peer]["peak_mib"], target=f"<= {mem_target}x" if mem_target else "")
            row.met = None if mem_target is None else ours["peak_mib"] <= mem_target * results[peer]["peak_mib"]
            rows.append(row)
    return rows


def run_ignored_rows(machine: Machine, repeats: int = 3, tokens: int = 2048, labelled: int = 256,
                     vocab: int = 49152, hidden_size: int = 576, progress=print) -> list[Row]:
    """fused_linear_cross_entropy fwd+bwd (trainable head) with `labelled` of `tokens` rows labelled vs all."""
    from fastft.losses import fused_linear_cross_entropy

    progress(f"cross-entropy, {labelled} of {tokens} tokens labelled vs all, V={vocab}")
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, generator=g).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, generator=g) * 0.05).requires_grad_()
    every = torch.randint(0, vocab, (tokens,), generator=g)
    some = every.clone()
    some[: tokens - labelled] = -100  # a long prompt, a short answer
    ms = compare_ms({"some": lambda: fused_linear_cross_entropy(hidden, weight, some).backward(),
                     "all": lambda: fused_linear_cross_entropy(hidden, weight, every).backward()}, repeats=repeats)
    row = Row(f"cross-entropy fwd+bwd, {labelled} of {tokens} rows labelled, V={vocab}", ms["some"],
              "fastft, all rows labelled", ms["all"], machine.gemm_ms(3 * 2 * labelled * hidden_size * vocab),
              target="<= 0.25x")
    row.met = ms["some"] <= 0.25 * ms["all"]
    progress(f"  -> {ms}")
    return [row]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kind", choices=tuple(SHAPES), required=True)
    parser.add_argument("--impl", choices=IMPLS + (FLOOR,), required=True)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    print(json.dumps(_measure(args.kind, args.impl, args.repeats)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
