"""Which implementation of each op runs: the C++ extension ("native"), Triton ("triton") or plain torch ("reference").

Defaults: CPU tensors take "native" when the extension `fastft._C` is built, else "reference"; CUDA tensors take
"triton" when Triton is importable, else "reference". `FASTFT_BACKEND=reference|native|triton` (or `set_backend`)
forces one path; a forced path that cannot run on the tensors' device raises instead of falling back silently.
Triton on CPU tensors runs only under the Triton interpreter (`TRITON_INTERPRET=1`), which the tests use.
`FASTFT_NO_AVX2=1` makes the C++ kernels take their scalar paths (what CPUs without AVX2 run); `FASTFT_NO_AVX512=1`
makes them take their AVX2 paths on AVX-512 CPUs. The choice is made at run time from
the CPU's flags.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings
from types import ModuleType

BACKENDS = ("reference", "native", "triton")
_forced: str | None = None
_native: ModuleType | None = None
_native_error: str | None = None
_native_loaded = False


def native_extension() -> ModuleType | None:
    """The compiled `fastft._C`, or None (with a one-time warning) when it was not built."""
    global _native, _native_error, _native_loaded
    if not _native_loaded:
        _native_loaded = True
        try:
            from fastft import _C

            _native = _C
        except ImportError as error:
            _native_error = str(error)
            warnings.warn(
                f"fastft's C++ extension is not available ({error}); CPU ops run on the plain-torch reference path. "
                "Reinstall with `pip install --no-build-isolation .` to build it.",
                RuntimeWarning,
                stacklevel=3,
            )
    return _native


def native_error() -> str | None:
    native_extension()
    return _native_error


def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def forced_backend() -> str | None:
    name = _forced if _forced is not None else os.environ.get("FASTFT_BACKEND") or None
    if name is not None and name not in BACKENDS:
        raise ValueError(f"FASTFT_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


def set_backend(name: str | None) -> None:
    """Force one backend for every op (None restores the defaults and FASTFT_BACKEND)."""
    global _forced
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {name!r}")
    _forced = name


@contextlib.contextmanager
def use_backend(name: str | None):
    """Context manager form of `set_backend`."""
    global _forced
    previous = _forced
    set_backend(name)
    try:
        yield
    finally:
        _forced = previous


def backend_for(device_type: str) -> str:
    """The backend that ops on tensors of `device_type` ("cpu", "cuda", ...) use now, validated."""
    forced = forced_backend()
    if device_type == "cpu":
        if forced == "native" and native_extension() is None:
            raise RuntimeError(f"FASTFT_BACKEND=native but the C++ extension is not built: {native_error()}")
        if forced == "triton" and not (triton_importable() and triton_interpreted()):
            raise RuntimeError("FASTFT_BACKEND=triton on CPU tensors needs triton and TRITON_INTERPRET=1")
        return forced or ("native" if native_extension() is not None else "reference")
    if device_type == "cuda":
        if forced == "native":
            raise RuntimeError("FASTFT_BACKEND=native has no CUDA kernels; use 'triton' or 'reference' on CUDA")
        if forced == "triton" and not triton_importable():
            raise RuntimeError("FASTFT_BACKEND=triton but triton is not installed")
        return forced or ("triton" if triton_importable() else "reference")
    if forced not in (None, "reference"):
        raise RuntimeError(f"FASTFT_BACKEND={forced} has no kernels for device type {device_type!r}")
    return "reference"


def describe() -> dict[str, str]:
    """Per device type, the backend in use and why (for `fastft info`)."""
    import torch

    native = native_extension()
    cpu_reason = (
        f"C++ extension built; vector paths: "
        f"{'AVX-512' if native.has_avx512() else 'AVX2' if native.has_avx2() else 'none (scalar code)'}"
        if native is not None
        else f"C++ extension not built: {native_error()}"
    )
    rows = {"cpu": f"{backend_for('cpu')} ({cpu_reason})"}
    if torch.cuda.is_available():
        cuda_reason = "triton importable" if triton_importable() else "triton not installed"
        rows["cuda"] = f"{backend_for('cuda')} ({cuda_reason}, {torch.cuda.get_device_name()})"
    else:
        rows["cuda"] = f"no CUDA device (triton {'importable' if triton_importable() else 'not installed'})"
    if forced_backend():
        rows["forced"] = f"FASTFT_BACKEND={forced_backend()}"
    return rows
