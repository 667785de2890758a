"""fastft.methods.upft with SmolLM2's tokenizer and a random 2-layer Llama: the examples' tokens and labels vs the
plain formula, the structure ratio, the on-disk cache, the collator, the fused loss on a UPFT batch vs
F.cross_entropy, bad configs, and the example script on the tiny model."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import fastft
from fastft.bench.smollm2 import smollm2_checkpoint
from fastft.methods.upft import UPFTCollator, UPFTConfig, build_upft_dataset, prompt_ids

PROMPTS = [f"What is {a} plus {b}?" for a, b in ((3, 4), (10, 22), (7, 7), (1, 99), (12, 5), (6, 60), (8, 1))]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(smollm2_checkpoint())


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=256)).eval()


def test_examples_follow_the_formula(model, tokenizer, tmp_path):
    config = UPFTConfig(prefix_tokens=4, structure_ratio=0.3, max_new_tokens=10, batch_size=4)
    examples = build_upft_dataset(model, tokenizer, PROMPTS, config, cache_dir=tmp_path, progress=False)
    assert len(examples) == len(PROMPTS)
    lengths = []
    for prompt, example in zip(PROMPTS, examples):
        ids = prompt_ids(tokenizer, prompt)
        assert example["input_ids"][:len(ids)] == ids
        trace = example["input_ids"][len(ids):]
        assert example["labels"] == [-100] * len(ids) + trace  # labels only on the kept trace tokens
        lengths.append(len(trace))
    # 2 of 7 (round(0.3 * 7)) keep the whole trace (10 tokens unless EOS came first), the rest exactly k = 4
    assert sorted(lengths)[:5] == [4] * 5 and all(4 < n <= 10 for n in sorted(lengths)[5:])
    assert prompt_ids(tokenizer, PROMPTS[0])[-4:] == tokenizer("<|im_start|>assistant\n")["input_ids"]


def test_cache_skips_generation(model, tokenizer, tmp_path, monkeypatch):
    config = UPFTConfig(prefix_tokens=4, structure_ratio=0.0, max_new_tokens=4)
    first = build_upft_dataset(model, tokenizer, PROMPTS[:3], config, cache_dir=tmp_path, progress=False)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and len(json.loads(files[0].read_text())) == 3

    def refuse(*args, **kwargs):
        raise AssertionError("generate called although the traces are cached")

    monkeypatch.setattr(model, "generate", refuse)
    assert build_upft_dataset(model, tokenizer, PROMPTS[:3], config, cache_dir=tmp_path, progress=False) == first
    with pytest.raises(AssertionError, match="generate called"):  # other settings: another key, a new sample
        build_upft_dataset(model, tokenizer, PROMPTS[:3], UPFTConfig(prefix_tokens=5, structure_ratio=0.0,
                                                                      max_new_tokens=5), cache_dir=tmp_path)


def test_collator_and_fused_loss_match_cross_entropy(model, tokenizer, tmp_path):
    config = UPFTConfig(prefix_tokens=4, structure_ratio=0.5, max_new_tokens=8)
    examples = build_upft_dataset(model, tokenizer, PROMPTS[:4], config, cache_dir=tmp_path, progress=False)
    batch = UPFTCollator(tokenizer.pad_token_id, pad_to_multiple_of=8)(examples)
    width = batch["input_ids"].shape[1]
    assert width % 8 == 0
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        assert batch["input_ids"][row, :n].tolist() == example["input_ids"]
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
        assert batch["labels"][row].tolist() == example["labels"] + [-100] * (width - n)
    plain = LlamaForCausalLM(model.config).train()
    plain.load_state_dict(model.state_dict())
    fused = LlamaForCausalLM(model.config).train()
    fused.load_state_dict(model.state_dict())
    fastft.patch(fused, fused_loss=True)
    logits = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1))
    loss = fused(**batch).loss
    assert abs(loss.item() - expected.item()) <= 1e-5 * expected.item()
    loss.backward()
    expected.backward()
    for (name, a), b in zip(fused.named_parameters(), plain.parameters()):
        assert (a.grad - b.grad).norm() <= 1e-5 * b.grad.norm(), name


@pytest.mark.parametrize("kwargs, match", [
    (dict(prefix_tokens=0), "prefix_tokens must be a positive int"),
    (dict(prefix_tokens=40, max_new_tokens=32), "must not exceed max_new_tokens"),
    (dict(structure_ratio=1.5), "structure_ratio must lie in"),
    (dict(temperature=0.0), "temperature must be > 0"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UPFTConfig(**kwargs)


def test_bad_prompts(model, tokenizer):
    with pytest.raises(ValueError, match="prompts must be a non-empty list"):
        build_upft_dataset(model, tokenizer, [])


def test_example_runs_on_a_tiny_model(tmp_path):
    script = Path(__file__).parents[2] / "examples" / "upft.py"
    out = subprocess.run([sys.executable, str(script), "--tiny", "--train", "6", "--eval", "2", "--k", "4",
                          "--max-new-tokens", "8", "--eval-tokens", "4", "--batch", "3",
                          "--cache-dir", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {line.split()[0]: line.split() for line in out.stdout.splitlines() if line.startswith(("UPFT", "full"))}
    upft_tokens, full_tokens = int(rows["UPFT"][1]), int(rows["full"][2])
    assert 5 * 4 <= upft_tokens < full_tokens  # k tokens per example, fewer than the whole traces
