"""examples/partial_ft.py and examples/prefix_tuning.py on tiny random models (SmolLM2's tokenizer): they run,
report what they train, and the loss goes down."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parents[2] / "examples"


def run(script, *args):
    out = subprocess.run([sys.executable, str(EXAMPLES / script), "--tiny", *args], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"loss (\d+\.\d+)", out.stdout)]
    return out.stdout, losses


def test_partial_ft_example():
    stdout, losses = run("partial_ft.py", "--top-k", "1", "--steps", "4", "--tokens", "48")
    assert "decoder layers trained: 3" in stdout and "held in 4-bit: 21" in stdout
    assert len(losses) == 4 and losses[-1] < losses[0]


@pytest.mark.parametrize("method, extra", [("prefix", ["--checkpointing"]), ("prompt", [])])
def test_prefix_tuning_example(method, extra):
    stdout, losses = run("prefix_tuning.py", "--method", method, "--steps", "4", "--batch", "2",
                         "--virtual-tokens", "4", *extra)
    assert "prompt learning (peft): 1" in stdout
    assert len(losses) == 4 and losses[-1] < losses[0]
