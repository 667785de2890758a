"""Generation with a patched model: SmolLM2-135M-Instruct with LoRA r=16 on every projection, greedy decoding of
16 new tokens after a 32-token prompt (decode steps are one-row matmuls, where per-call overheads weigh most).
fp32 base: peft vs `fastft.patch`; 4-bit base (NF4, double quant): peft + bitsandbytes' own CPU inference path
vs `fastft.patch`. Both models of a pair hold the same weights and adapters; the tokens generated are compared.
`run_layers`: the decode calls of one decoder layer's LoRA projections (one row, no grad), per call, the same pairs.

    python -m fastft.bench.generate [--layers]     # the generate rows, or (--layers) the per-layer calls"""

from __future__ import annotations

import sys

import torch

from fastft.bench.harness import Machine, Row, compare_ms

NEW_TOKENS = 16
PROMPT = 32


def _models(four_bit: bool):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from fastft.bench.smollm2 import smollm2_checkpoint

    path = smollm2_checkpoint()
    extra = {}
    if four_bit:
        extra["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                          bnb_4bit_use_double_quant=True,
                                                          bnb_4bit_compute_dtype=torch.float32)
    models = []
    for _ in range(2):
        base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **extra)
        torch.manual_seed(1)
        config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
        models.append(get_peft_model(base, config).eval())
    return models


def _generate(model, prompt):
    def run():
        with torch.no_grad():
            return model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                  max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    return run


def run(machine: Machine, repeats: int = 5, progress=print) -> list[Row]:
    import fastft

    try:
        from fastft.bench.smollm2 import smollm2_checkpoint

        smollm2_checkpoint()
    except ModuleNotFoundError as error:  # the model comes from an optional package
        print(f"  generate rows skipped: {error}")
        return []
    prompt = torch.randint(0, 49152, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    rows = []
    for four_bit, peer in ((False, "peft"), (True, "peft + bitsandbytes")):
        progress(f"generate, SmolLM2 {'4-bit' if four_bit else 'fp32'} base")
        reference, patched = _models(four_bit)
        fastft.patch(patched)
        same = torch.equal(_generate(patched, prompt)(), _generate(reference, prompt)())
        times = compare_ms({"fastft": _generate(patched, prompt), "peer": _generate(reference, prompt)},
                           repeats=repeats)
        base = "4-bit NF4" if four_bit else "fp32"
        rows.append(Row(f"SmolLM2 LoRA r=16 generate {NEW_TOKENS} tokens, {base} base, batch 1"
                        f"{'' if same else ' (tokens differ: ' + ('bitsandbytes computes in bf16)' if four_bit else 'rounding)')}", times["fastft"], peer, times["peer"],
                        target="at least as fast as the peer", met=times["fastft"] <= times["peer"]))
    return rows


def run_layers(repeats: int = 9, calls: int = 200, progress=print) -> list[Row]:
    """Per-call time (ms, median of `repeats` interleaved rounds of `calls` calls) of layer 3's q/k/v group, o_proj
    and down_proj on one row under no grad: fastft's decode path vs peft (fp32) / peft + bitsandbytes (4-bit)."""
    import fastft

    rows = []
    for four_bit, peer in ((False, "peft"), (True, "peft + bitsandbytes")):
        progress(f"decode calls, SmolLM2 {'4-bit' if four_bit else 'fp32'} base")
        reference, patched = _models(four_bit)
        fastft.patch(patched)
        x, h = torch.randn(1, 1, 576), torch.randn(1, 1, 1536)

        def calls_of(model):
            layer = model.base_model.model.model.layers[3]
            attention, mlp = layer.self_attn, layer.mlp
            return {"q/k/v (576 -> 576, 192, 192)":
                    lambda: (attention.q_proj(x), attention.k_proj(x), attention.v_proj(x)),
                    "o_proj (576 -> 576)": lambda: attention.o_proj(x),
                    "down_proj (1536 -> 576)": lambda: mlp.down_proj(h)}

        ours, theirs = calls_of(patched), calls_of(reference)
        with torch.no_grad():
            for name in ours:
                times = compare_ms({"fastft": _repeat(ours[name], calls), "peer": _repeat(theirs[name], calls)},
                                   repeats=repeats)
                base = "4-bit NF4" if four_bit else "fp32"
                rows.append(Row(f"SmolLM2 decode call, {name}, {base} base + LoRA r=16, 1 row, per call",
                                times["fastft"] / calls, peer, times["peer"] / calls,
                                target="at least as fast as the peer", met=times["fastft"] <= times["peer"]))
    return rows


def _repeat(fn, calls: int):
    def run():
        for _ in range(calls):
            fn()
    return run


if __name__ == "__main__":
    layers = "--layers" in sys.argv
    unit, scale = ("us", 1000) if layers else ("ms", 1)
    for row in (run_layers() if layers else run(None)):
        print(f"{row.case}: fastft {row.fastft_ms * scale:.1f} {unit}, {row.peer} {row.peer_ms * scale:.1f} {unit} "
              f"(peer / fastft {row.peer_ms / row.fastft_ms:.2f}x)")
