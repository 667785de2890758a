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


def run_layer(machine: Machine, tokens: int = 2048, size: int = 4096, repeats: int = 3, progress=print) -> list[Row]:
    """FakeQuantLinear (int4 g32 weights, int8 per-token activations) vs nn.Linear and torchao's
    FakeQuantizedLinear, fwd+bwd with a trainable weight."""
    from torchao.quantization.qat import IntxFakeQuantizeConfig
    from torchao.quantization.qat.linear import FakeQuantizedLinear

    from fastft.nn import FakeQuantLinear

    progress(f"FakeQuantLinear {tokens}x{size} @ {size}x{size}, fwd+bwd")
    torch.manual_seed(0)
    linear = torch.nn.Linear(size, size)
    ours = FakeQuantLinear.from_linear(linear, weight_bits=4, group_size=32, activation_bits=8)
    theirs = FakeQuantizedLinear(size, size, bias=True, activation_config=IntxFakeQuantizeConfig(
        torch.int8, granularity="per_token", is_symmetric=False), weight_config=IntxFakeQuantizeConfig(
        torch.int4, group_size=32, is_symmetric=True))
    theirs.load_state_dict(linear.state_dict())
    x = torch.randn(tokens, size, requires_grad=True)
    grad = torch.randn(tokens, size)

    def step(layer):
        return lambda: torch.autograd.grad(layer(x), [x, layer.weight, layer.bias], grad)

    ms = compare_ms({"fastft": step(ours), "linear": step(linear), "torchao": step(theirs)}, repeats=repeats)
    bound = machine.gemm_ms(3 * 2 * tokens * size * size)
    plain = Row("FakeQuantLinear int4 g32 + int8 tokens, 2048x4096 @ 4096x4096, fwd+bwd", ms["fastft"],
                "nn.Linear (no fake quant)", ms["linear"], bound, "<= 1.2x nn.Linear time")
    plain.met = ms["fastft"] <= 1.2 * ms["linear"]
    peer = Row("FakeQuantLinear int4 g32 + int8 tokens, 2048x4096 @ 4096x4096, fwd+bwd", ms["fastft"],
               "torchao FakeQuantizedLinear", ms["torchao"], bound)
    return [plain, peer]


def run_step(machine: Machine, steps: int = 3, progress=print) -> list[Row]:
    """A mini Llama QAT step (the LoRA benchmark's model: 4 layers, hidden 1024, vocab 32000, 4 x 512 tokens; int4
    g32 weights and int8 per-token activations on every projection but lm_head), fastft (with and without the fused
    LM loss) vs torchao, interleaved with the same step without fake quantization (the floor of any QAT step)."""
    import copy

    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig
    from transformers import LlamaConfig, LlamaForCausalLM

    import fastft
    from fastft import qat as fastft_qat

    progress("mini Llama QAT step, fastft vs torchao (interleaved)")
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                                        num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=16,
                                        max_position_embeddings=1024))
    ours, theirs, plain = base, copy.deepcopy(base), copy.deepcopy(base)
    fastft_qat.prepare(ours, weight_bits=4, group_size=32, activation_bits=8)
    quantize_(theirs, QATConfig(
        activation_config=IntxFakeQuantizeConfig(torch.int8, granularity="per_token", is_symmetric=False),
        weight_config=IntxFakeQuantizeConfig(torch.int4, group_size=32, is_symmetric=True), step="prepare"),
        filter_fn=lambda module, name: isinstance(module, torch.nn.Linear) and "lm_head" not in name)
    ids = torch.randint(0, 32000, (4, 512), generator=torch.Generator().manual_seed(0))

    def train_step(model):
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-6)

        def run():
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return run

    fused_loss = copy.deepcopy(ours)
    fastft.patch(fused_loss, fused_loss=True)  # the LM loss (and lm_head's gradient) without logits
    ms = compare_ms({"fastft": train_step(ours), "fastft + fused loss": train_step(fused_loss),
                     "torchao": train_step(theirs), "plain": train_step(plain)}, repeats=steps)
    # The floor: the same step without fake quantization, which no fake-quant implementation can beat.
    rows = [Row("mini Llama step without fake quantization (the floor)", ms["plain"], "torchao QAT", ms["torchao"])]
    for variant in ("fastft", "fastft + fused loss"):
        row = Row(f"mini Llama QAT step, int4 g32 weights + int8 tokens (4 x 512 tokens), {variant}", ms[variant],
                  "torchao QAT", ms["torchao"], target=">= 1.5x torchao")
        row.met = row.speedup >= 1.5
        rows.append(row)
    return rows
