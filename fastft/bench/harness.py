"""Benchmark harness: timing, the machine's bounds and result files. CPU figures only, labelled as such."""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


def best_ms(fn, repeats: int = 5, warmup: int = 1) -> float:
    """Shortest wall time of fn() in milliseconds after `warmup` calls: what the machine can do at best."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def compare_ms(fns: dict, repeats: int = 5, warmup: int = 1) -> dict[str, float]:
    """Median wall time (ms) of each function, timed in interleaved rounds so that drifts of a shared
    machine's speed hit every side alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def saved_for_backward_bytes(fn, exclude=()) -> int:
    """Bytes of the tensors autograd saves while running fn() (each storage counted once), leaving out the
    storages of the tensors in `exclude` (e.g. a model's parameters, which exist anyway)."""
    storages = {}
    excluded = {t.untyped_storage().data_ptr() for t in exclude}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(storages.values())


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_rss_above_now_mib(fn) -> float:
    """Peak resident memory while running fn(), above the resident memory before it, in MiB (Linux: the peak is
    reset through /proc/self/clear_refs first, so earlier transients do not count). Run with
    MALLOC_MMAP_THRESHOLD_ set low so that freed large tensors leave the resident set at once."""
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) / 1024


@dataclass
class Machine:
    """Measured limits (best of several runs): copy bandwidth (bytes read + written per second) and fp32 GEMM rate."""

    cpu: str
    threads: int
    copy_gbps: float
    gemm_gflops: float

    @classmethod
    def measure(cls) -> Machine:
        src = torch.randn(32 * 1024 * 1024)  # 128 MiB, far beyond the caches
        dst = torch.empty_like(src)
        copy_ms = best_ms(lambda: dst.copy_(src), repeats=10, warmup=2)
        a, b = torch.randn(2048, 4096), torch.randn(4096, 4096)
        gemm_ms = best_ms(lambda: a @ b, repeats=3)
        return cls(cpu=_cpu_name(), threads=torch.get_num_threads(), copy_gbps=2 * src.nbytes / copy_ms / 1e6,
                   gemm_gflops=2 * 2048 * 4096 * 4096 / gemm_ms / 1e6)

    def copy_ms(self, nbytes: float) -> float:
        return nbytes / self.copy_gbps / 1e6

    def gemm_ms(self, flops: float) -> float:
        return flops / self.gemm_gflops / 1e6


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


@dataclass
class Row:
    """One case: fastft's time, the peer's, their ratio, and fastft's fraction of the machine bound."""

    case: str
    fastft_ms: float
    peer: str
    peer_ms: float
    bound_ms: float | None = None
    target: str = ""
    met: bool | None = None
    fastft_saved_bytes: int | None = None  # saved for backward, when the case has a backward
    peer_saved_bytes: int | None = None

    @property
    def speedup(self) -> float:
        return self.peer_ms / self.fastft_ms

    @property
    def of_bound(self) -> float | None:
        return None if self.bound_ms is None else self.bound_ms / self.fastft_ms


def markdown(machine: Machine, rows: list[Row], command: str) -> str:
    lines = [
        f"CPU results ({machine.cpu}, {machine.threads} threads, torch {torch.__version__}); "
        f"copy bandwidth {machine.copy_gbps:.1f} GB/s, fp32 GEMM {machine.gemm_gflops:.0f} GFLOP/s. "
        f"Command: `{command}`",
        "",
        "| case | fastft ms | peer | peer ms | peer / fastft | of machine bound | saved for backward MiB "
        "(fastft / peer) | target | met |",
        "|---|---:|---|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        bound = "" if r.of_bound is None else f"{100 * r.of_bound:.0f}%"
        met = "" if r.met is None else ("yes" if r.met else "no")
        saved = ("" if r.fastft_saved_bytes is None
                 else f"{r.fastft_saved_bytes / 2**20:.1f} / {r.peer_saved_bytes / 2**20:.1f}")
        lines.append(f"| {r.case} | {r.fastft_ms:.2f} | {r.peer} | {r.peer_ms:.2f} | {r.speedup:.2f}x | {bound} "
                     f"| {saved} | {r.target} | {met} |")
    return "\n".join(lines) + "\n"


def write_results(out_dir: Path, suite: str, machine: Machine, rows: list[Row], command: str) -> list[Path]:
    """JSON, Markdown and a PNG plot of the speedups under out_dir; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{suite}"
    payload = {"suite": suite, "command": command, "python": sys.version.split()[0], "torch": torch.__version__,
               "machine": asdict(machine),
               "rows": [asdict(r) | {"speedup": r.speedup, "of_bound": r.of_bound} for r in rows]}
    paths = [stem.with_suffix(".json"), stem.with_suffix(".md")]
    paths[0].write_text(json.dumps(payload, indent=2))
    paths[1].write_text(markdown(machine, rows, command))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return paths
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(rows) + 1.5))
    labels = [f"{r.case} vs {r.peer}" for r in rows]
    ax.barh(labels, [r.speedup for r in rows], color=["tab:green" if r.speedup >= 1 else "tab:red" for r in rows])
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("peer time / fastft time (higher is better)")
    ax.set_title(f"fastft {suite} suite, CPU ({machine.threads} threads)")
    ax.invert_yaxis()
    fig.tight_layout()
    paths.append(stem.with_suffix(".png"))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths
