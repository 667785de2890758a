"""UPFT, unsupervised prefix fine-tuning (Ji et al. 2025, arXiv 2503.02875): for each unlabeled prompt, sample one
reasoning trace from the model itself, keep only its first k tokens (k = 8-32) and train with the causal-LM loss on
prompt + prefix, only the prefix tokens labelled. A fraction of the examples (the structure ratio) keeps its whole
trace, so the model still sees how a solution ends.

    config = UPFTConfig(prefix_tokens=16, structure_ratio=0.1)
    examples = build_upft_dataset(model, tokenizer, prompts, config, cache_dir="upft-cache")
    trainer = Trainer(model, args, train_dataset=examples, data_collator=UPFTCollator(tokenizer.pad_token_id))

Generation is batched (left padding, a progress bar) and asks for only k new tokens for the prefix-only examples; its
result is cached on disk under a key of the prompts, the generation settings and the model's weights, so a rerun
reads it instead of generating. With `fastft.patch(model, fused_loss=True)` the loss runs on fastft's fused
cross-entropy from the hidden states.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass
class UPFTConfig:
    """prefix_tokens: k, the trace tokens kept and labelled (the paper uses 8-32); structure_ratio: fraction of the
    examples that keep the whole trace (up to max_new_tokens); sampling settings of the traces; batch_size of
    generation; seed: picks the structure examples and seeds the sampling; chat_template: format the prompts with
    the tokenizer's chat template (when it has one)."""

    prefix_tokens: int = 16
    structure_ratio: float = 0.1
    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.95
    batch_size: int = 16
    seed: int = 0
    chat_template: bool = True

    def __post_init__(self):
        for name in ("prefix_tokens", "max_new_tokens", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.prefix_tokens > self.max_new_tokens:
            raise ValueError(f"prefix_tokens ({self.prefix_tokens}) must not exceed max_new_tokens "
                             f"({self.max_new_tokens})")
        if not 0.0 <= self.structure_ratio <= 1.0:
            raise ValueError(f"structure_ratio must lie in [0, 1], got {self.structure_ratio!r}")
        if not self.temperature > 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"temperature must be > 0 and top_p in (0, 1], got {self.temperature!r}, {self.top_p!r}")


def prompt_ids(tokenizer, prompt: str, chat_template: bool = True) -> list[int]:
    """The token ids the model is prompted with: the chat template's user turn + generation prompt, or the text."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def _cache_key(model, prompts: list[list[int]], lengths: list[int], config: UPFTConfig) -> str:
    digest = hashlib.sha256(json.dumps([prompts, lengths, asdict(config)]).encode())
    digest.update(model.config.to_json_string().encode())
    with torch.no_grad():  # the weights' fingerprint: a rerun on other weights regenerates
        for param in model.parameters():
            digest.update(param.detach().float().sum().double().cpu().numpy().tobytes())
    return digest.hexdigest()[:24]


def sample_traces(model, tokenizer, prompts: list[list[int]], lengths: list[int], config: UPFTConfig,
                  cache_dir: str | Path | None = None, progress: bool = True) -> list[list[int]]:
    """One sampled continuation per prompt (token ids), of at most lengths[i] new tokens, ended at EOS (kept).
    Batched with left padding; cached as JSON under cache_dir when given."""
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"upft-traces-{_cache_key(model, prompts, lengths, config)}.json"
        if path.exists():
            return json.loads(path.read_text())
    from tqdm.auto import tqdm

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(config.seed)
    was_training = model.training
    model.eval()
    order = sorted(range(len(prompts)), key=lambda i: (lengths[i], len(prompts[i])))  # similar rows batch together
    traces: list[list[int]] = [[] for _ in prompts]
    try:
        for start in tqdm(range(0, len(order), config.batch_size), desc="UPFT: sampling traces", disable=not progress):
            rows = order[start:start + config.batch_size]
            width = max(len(prompts[i]) for i in rows)
            ids = torch.tensor([[pad] * (width - len(prompts[i])) + prompts[i] for i in rows])
            mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in rows])
            with torch.no_grad():
                out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                                     max_new_tokens=max(lengths[i] for i in rows), do_sample=True,
                                     temperature=config.temperature, top_p=config.top_p, pad_token_id=pad)
            for row, i in zip(out[:, width:].tolist(), rows):
                row = row[:lengths[i]]
                traces[i] = row[:row.index(eos) + 1] if eos in row else row
    finally:
        model.train(was_training)
        torch.random.set_rng_state(generator_state)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(traces))
    return traces


def structure_examples(count: int, config: UPFTConfig) -> set[int]:
    """Indices of the examples that keep their whole trace: round(structure_ratio * count), drawn with the seed."""
    return set(random.Random(config.seed).sample(range(count), round(config.structure_ratio * count)))


def upft_example(prompt: list[int], trace: list[int], keep: int) -> dict:
    """input_ids = prompt + trace[:keep]; labels -100 on the prompt, the token ids on the kept trace."""
    kept = trace[:keep]
    return {"input_ids": prompt + kept, "labels": [-100] * len(prompt) + kept}


def build_upft_dataset(model, tokenizer, prompts: list[str], config: UPFTConfig | None = None,
                       cache_dir: str | Path | None = None, progress: bool = True) -> list[dict]:
    """The UPFT training examples of `prompts` (a list of {"input_ids", "labels"}, for UPFTCollator): the prefix
    examples sample only prefix_tokens new tokens, the structure examples up to max_new_tokens."""
    config = config or UPFTConfig()
    if not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty strings")
    ids = [prompt_ids(tokenizer, p, config.chat_template) for p in prompts]
    full = structure_examples(len(ids), config)
    lengths = [config.max_new_tokens if i in full else config.prefix_tokens for i in range(len(ids))]
    traces = sample_traces(model, tokenizer, ids, lengths, config, cache_dir, progress)
    return [upft_example(p, t, len(t) if i in full else config.prefix_tokens)
            for i, (p, t) in enumerate(zip(ids, traces))]


class UPFTCollator:
    """Pads a list of {"input_ids", "labels"} examples on the right into input_ids / attention_mask / labels
    tensors (labels -100 on padding), optionally to a multiple of pad_to_multiple_of."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        if not isinstance(pad_token_id, int):
            raise TypeError(f"pad_token_id must be an int, got {pad_token_id!r}")
        self.pad_token_id, self.pad_to_multiple_of = pad_token_id, pad_to_multiple_of

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(e["input_ids"]) for e in examples)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for e in examples:
            gap = width - len(e["input_ids"])
            batch["input_ids"].append(list(e["input_ids"]) + [self.pad_token_id] * gap)
            batch["attention_mask"].append([1] * len(e["input_ids"]) + [0] * gap)
            batch["labels"].append(list(e["labels"]) + [-100] * gap)
        return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
