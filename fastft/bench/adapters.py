"""Bottleneck adapter benchmarks: fastft's fused adapter vs the same adapter written as plain torch
(h + up(act(down(h))) with nn.Linear), on the same inputs in this process.

- one adapter: h of 4096 tokens x 1024, bottleneck 64, GELU, fwd+bwd (dh and every adapter gradient);
- a mini Llama training step (the LoRA benchmark's model: 4 layers, hidden 1024, vocab 32000, 4 x 512 tokens)
  with Houlsby adapters (reduction 16, GELU) and a frozen base, fused vs plain-torch adapters.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from fastft.bench.harness import Machine, Row, compare_ms, saved_for_backward_bytes
from fastft.nn import BottleneckAdapter
from fastft.reference.bottleneck import bottleneck_adapter_ref


def _plain_forward(self, h, residual=None):
    norm = self.norm
    return bottleneck_adapter_ref(h, self.down.weight, self.down.bias, self.up.weight, self.up.bias, self.activation,
                                  self.scale, residual, norm.weight if norm is not None else None,
                                  norm.bias if norm is not None else None, norm is not None,
                                  norm.eps if norm is not None else 1e-5)


@contextlib.contextmanager
def _plain_adapters():
    """BottleneckAdapter runs as plain torch autograd (what an unfused adapter library does) inside the block."""
    fused = BottleneckAdapter.forward
    BottleneckAdapter.forward = _plain_forward
    try:
        yield
    finally:
        BottleneckAdapter.forward = fused


def run_layer(machine: Machine, tokens: int = 4096, hidden: int = 1024, bottleneck: int = 64, repeats: int = 5,
              progress=print) -> list[Row]:
    progress(f"bottleneck adapter {tokens}x{hidden}, r={bottleneck}, GELU, fwd+bwd")
    torch.manual_seed(0)
    adapter = BottleneckAdapter(hidden, bottleneck_size=bottleneck, activation="gelu", init="default")
    with torch.no_grad():
        adapter.up.weight.normal_(std=0.02)  # a trained adapter, not the identity
    plain = nn.ModuleDict({"down": nn.Linear(hidden, bottleneck), "up": nn.Linear(bottleneck, hidden)})
    plain.load_state_dict(adapter.state_dict())
    h = torch.randn(tokens, hidden, requires_grad=True)
    grad = torch.randn(tokens, hidden)

    def fastft_fn():
        return adapter(h)

    def plain_fn():
        return h + plain["up"](F.gelu(plain["down"](h)))

    def step(fn, params):
        return lambda: torch.autograd.grad(fn(), [h, *params], grad)

    ms = compare_ms({"fastft": step(fastft_fn, list(adapter.parameters())),
                     "plain": step(plain_fn, list(plain.parameters()))}, repeats=repeats)
    exclude = [h, *adapter.parameters(), *plain.parameters()]
    saved = {"fastft": saved_for_backward_bytes(fastft_fn, exclude=exclude),
             "plain": saved_for_backward_bytes(plain_fn, exclude=exclude)}
    flops = 3 * 2 * 2 * tokens * hidden * bottleneck  # two projections, forward + two backward GEMMs each
    row = Row(f"bottleneck adapter {tokens}x{hidden}, r={bottleneck}, GELU, fwd+bwd", ms["fastft"],
              "plain torch adapter", ms["plain"], machine.gemm_ms(flops), ">= 1.3x plain, <= 0.5x its saved bytes",
              fastft_saved_bytes=saved["fastft"], peer_saved_bytes=saved["plain"])
    row.met = row.speedup >= 1.3 and saved["fastft"] <= 0.5 * saved["plain"]
    return [row]


def _mini_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                         num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=1024)
    return LlamaForCausalLM(config)


def run_step(machine: Machine, steps: int = 3, progress=print) -> list[Row]:
    from fastft import adapters

    progress("mini Llama training step with Houlsby adapters, fused vs plain torch (interleaved)")
    model = _mini_llama()
    adapters.add_adapters(model, adapters.AdapterConfig(placement="houlsby", reduction_factor=16, activation="gelu"))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, 32000, (4, 512), generator=torch.Generator().manual_seed(0))

    def train_step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def plain_step():
        with _plain_adapters():
            train_step()

    saved = {}
    for name, context in (("fastft", contextlib.nullcontext), ("plain", _plain_adapters)):
        with context():
            saved[name] = saved_for_backward_bytes(lambda: model(input_ids=ids, labels=ids).loss,
                                                   exclude=list(model.parameters()))
    ms = compare_ms({"fastft": train_step, "plain": plain_step}, repeats=steps)
    row = Row("mini Llama step, Houlsby adapters r=64 (4 x 512 tokens)", ms["fastft"],
              "plain torch adapters", ms["plain"], target="(no target)", fastft_saved_bytes=saved["fastft"],
              peer_saved_bytes=saved["plain"])
    return [row]
