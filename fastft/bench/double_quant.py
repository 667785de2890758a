"""Double quantization vs bitsandbytes' CPU quantizer on real weights: the 14 projection matrices of SmolLM2-135M's
first two layers, quantized by both (NF4, blocksize 64, double quant). Prints how many 8-bit absmax codes differ,
by how many steps of the dynamic map, which side's code is nearer to the value it encodes, and what that does to
the block scales and the dequantized weights.

    python -m fastft.bench.double_quant
"""

from __future__ import annotations

import torch


def compare() -> dict:
    from bitsandbytes.functional import quantize_4bit

    from fastft import nf4
    from fastft.bench.smollm2 import load_smollm2
    from fastft.reference import nf4 as ref

    model, _ = load_smollm2()
    table = ref.dynamic_map()
    totals = dict(matrices=0, codes=0, differ=0, max_steps=0, fastft_nearer_or_equal=0, scale_rel=0.0,
                  weights=0, weights_differ=0, weight_max_abs=0.0)
    for name, module in model.named_modules():
        if not (isinstance(module, torch.nn.Linear) and (".layers.0." in name or ".layers.1." in name)):
            continue
        weight = module.weight.detach()
        theirs_packed, theirs = quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
        packed, ours = nf4.quantize(weight, 64, double_quant=True)
        if not torch.equal(theirs_packed, packed) or ours.nested_offset != float(theirs.offset):
            raise AssertionError(f"{name}: 4-bit codes or offset differ from bitsandbytes'")
        if not torch.equal(ours.nested_absmax, theirs.state2.absmax):
            raise AssertionError(f"{name}: nested scales differ from bitsandbytes'")
        a, b = theirs.absmax.long(), ours.absmax.long()
        differ = a != b
        values = nf4.quantize(weight, 64)[1].absmax - theirs.offset
        x = ref.scale_to_unit(values, theirs.state2.absmax, 256)
        nearer = (table[b] - x).abs() <= (table[a] - x).abs()
        scale = ours.nested_absmax.repeat_interleave(256)[: b.numel()]
        s_theirs, s_ours = table[a] * scale + ours.nested_offset, table[b] * scale + ours.nested_offset
        w_theirs = nf4.dequantize(packed, nf4.NF4State.from_bnb(theirs), torch.float32)
        w_ours = nf4.dequantize(packed, ours, torch.float32)
        totals["matrices"] += 1
        totals["codes"] += a.numel()
        totals["differ"] += int(differ.sum())
        totals["max_steps"] = max(totals["max_steps"], int((a - b).abs().max()))
        totals["fastft_nearer_or_equal"] += int(nearer[differ].sum())
        totals["scale_rel"] = max(totals["scale_rel"], float(((s_theirs - s_ours).abs() / s_ours.abs()).max()))
        totals["weights"] += weight.numel()
        totals["weights_differ"] += int((w_theirs != w_ours).sum())
        totals["weight_max_abs"] = max(totals["weight_max_abs"], float((w_theirs - w_ours).abs().max()))
    return totals


if __name__ == "__main__":
    t = compare()
    print(f"{t['matrices']} matrices: {t['differ']} of {t['codes']} absmax codes differ (at most {t['max_steps']} "
          f"step(s) of the map), fastft's nearer or as near in {t['fastft_nearer_or_equal']}; block scales differ by "
          f"<= {t['scale_rel']:.4f} relative; {t['weights_differ']} of {t['weights']} weights dequantize "
          f"differently, max {t['weight_max_abs']:.4g}")
