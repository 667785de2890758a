"""Fake-quantization benchmarks: fastft.qat.fake_quantize vs torchao's IntxFakeQuantizer (same config, same
inputs, this process), forward + backward."""

from __future__ import annotations

import torch

from fastft.bench.harness import Machine, Row, compare_ms


def run(machine: Machine, repeats: int = 5, progress=print) -> list[Row]:
    from torchao.quantization.qat import IntxFakeQuantizeConfig, IntxFakeQuantizer

    from fastft.qat import fake_quantize

    rows = []
    cases = (("int4 g32 symmetric weight fake-quant 4096x4096 fp32, fwd+bwd", (4096, 4096),
              dict(bits=4, group_size=32, symmetric=True, granularity="per_group"),
              IntxFakeQuantizeConfig(torch.int4, group_size=32, is_symmetric=True), 4.0),
             ("int8 per-token asymmetric activation fake-quant 2048x4096 fp32, fwd+bwd", (2048, 4096),
              dict(bits=8, symmetric=False, granularity="per_token"),
              IntxFakeQuantizeConfig(torch.int8, granularity="per_token", is_symmetric=False), 3.0))
    for name, shape, ours, config, target in cases:
        progress(name)
        torch.manual_seed(0)
        x = torch.randn(*shape, requires_grad=True)
        grad = torch.randn(*shape)
        quantizer = IntxFakeQuantizer(config)
        ms = compare_ms({"fastft": lambda: torch.autograd.grad(fake_quantize(x, **ours), [x], grad),
                         "torchao": lambda: torch.autograd.grad(quantizer(x), [x], grad)}, repeats=repeats)
        # the bound: read x, write out (forward); read dy and x, write dx (backward)
        row = Row(name, ms["fastft"], "torchao", ms["torchao"], machine.copy_ms(5 * x.numel() * x.element_size()),
                  f">= {target:g}x torchao")
        row.met = row.speedup >= target
        rows.append(row)
    return rows
