"""Command line: `fastft bench` (side-by-side benchmarks) and `fastft info` (which kernels run here and why)."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path


def _info(_args) -> int:
    import torch

    import fastft
    from fastft.ops import describe

    print(f"fastft {fastft.__version__}, torch {torch.__version__}, python {sys.version.split()[0]}")
    for device, line in describe().items():
        print(f"  {device}: {line}")
    from torch._library.custom_ops import CustomOpDef

    from fastft import ops
    from fastft.ops.routing import describe_routes

    names = sorted(op._qualname for module in (ops.nf4, ops.lora, ops.distillation, ops.logprobs, ops.bottleneck,
                                               ops.qat)
                   for op in vars(module).values() if isinstance(op, CustomOpDef))
    print("  implementations per op (routing table, fastft/ops/backends/) and which runs here:")
    devices = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
    for line in describe_routes(devices):
        print(f"    {line}")
    print("  ops: " + ", ".join(names))
    return 0


def _bench(args) -> int:
    import torch

    if args.suite == "gpu-compile":  # no benchmark: the ahead-of-time compile sweep (no GPU needed)
        from fastft.bench import gpu_compile

        return gpu_compile.main([])
    if args.suite == "gpu":
        from fastft.bench import gpu

        gpu.run(Path(args.out))
        return 0
    from fastft.bench import SUITES, markdown, run_suite

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"fastft bench: suite '{args.suite}' ({SUITES[args.suite]}), CPU, {torch.get_num_threads()} threads")
    command = "fastft bench " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    machine, rows, paths = run_suite(args.suite, Path(args.out), args.repeats, command.strip())
    print()
    print(markdown(machine, rows, command.strip()))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


GPU_SUITES = {"gpu": "the CUDA suite (bench/gpu_check.sh runs it)",
              "gpu-compile": "every Triton kernel compiled for sm_80 / sm_90, no GPU needed"}


def main(argv=None) -> int:
    from fastft.bench import SUITES

    parser = argparse.ArgumentParser(prog="fastft", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="run a benchmark suite side by side with the peers")
    bench.add_argument("--suite", default="quick", choices=[*SUITES, *GPU_SUITES],
                       help="which suite (default: quick); " + "; ".join(f"{k}: {v}" for k, v in GPU_SUITES.items()))
    bench.add_argument("--out", default="bench/results", help="where JSON, Markdown and PNG results go")
    bench.add_argument("--repeats", type=int, default=5,
                       help="timed runs per case, median reported (lora and adapters suites: training steps per case)")
    bench.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's default)")
    bench.set_defaults(func=_bench)
    info = sub.add_parser("info", help="which implementation each op uses on this machine, and why")
    info.set_defaults(func=_info)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
