"""The examples of the continual, multi-task and domain-adaptation methods run end to end on a tiny random Llama
(`--tiny`) and report finite figures."""

import importlib.util
import math
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parents[2] / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name,keys", [
    ("continual_ewc_replay", ("A after A", "A after B, plain", "A after B, EWC+replay")),
    ("multitask", ("arith after", "shout after", "ms/step routed")),
    ("domain_adaptation", ("target after source-only", "target after DANN")),
])
def test_example_runs_tiny(name, keys, capsys):
    figures = load(name).main(["--tiny", "--steps", "3"])
    assert all(k in figures and math.isfinite(figures[k]) for k in keys)
    assert keys[0] in capsys.readouterr().out
