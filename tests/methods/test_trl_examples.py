"""examples/dpo_with_trl.py and examples/grpo_with_trl.py run (on a random-init 2-layer model with SmolLM2's
tokenizer) with fastft's head in place of TRL's, and print their per-step figures."""

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize("example", ("dpo_with_trl.py", "grpo_with_trl.py"))
def test_example_script_runs(example):
    script = Path(__file__).parents[2] / "examples" / example
    result = subprocess.run([sys.executable, str(script), "--tiny", "--max-steps", "2"], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "TRL fused LM heads: 1 of 1 on fastft::fused_linear_logprobs" in result.stdout
    assert "step 2: loss" in result.stdout and "2 steps" in result.stdout
