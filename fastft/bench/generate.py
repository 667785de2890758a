"""Generation with a patched model: SmolLM2-135M-Instruct with LoRA r=16 on every projection, greedy decoding of
16 new tokens after a 32-token prompt (decode steps are one-row matmuls, where per-call overheads weigh most).
fp32 base: peft vs `fastft.patch`; 4-bit base (NF4, double quant): peft + bitsandbytes' own CPU inference path
vs `fastft.patch`. Both models of a pair hold the same weights and adapters; the tokens generated are compared."""

from __future__ import annotations

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
