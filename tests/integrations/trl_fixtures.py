"""A tiny Llama and a word-level tokenizer built in process (no downloads) for TRL trainers in tests, and a GRPO
batch as GRPOTrainer's generation step leaves it."""

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

WORDS = [f"w{i}" for i in range(200)]


def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {word: i for i, word in enumerate(["<pad>", "<eos>", "<unk>", *WORDS])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def tiny_llama(seed: int = 0, vocab: int = 203) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=0, eos_token_id=1, bos_token_id=1, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def sentence(g: torch.Generator, lo: int, hi: int) -> str:
    n = int(torch.randint(lo, hi, (1,), generator=g))
    return " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (n,), generator=g))


def preference_dataset(n: int = 8, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    rows = [{"prompt": sentence(g, 3, 9) + " ", "chosen": sentence(g, 2, 7), "rejected": sentence(g, 2, 7)}
            for _ in range(n)]
    return Dataset.from_list(rows)


def text_dataset(n: int = 8, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    return Dataset.from_list([{"prompt": sentence(g, 3, 9) + " ", "completion": sentence(g, 2, 7)}
                              for _ in range(n)])


def grpo_inputs(trainer, g):
    """4 completions of up to 7 tokens (two cut short) after 5 prompt tokens, old / reference log-probabilities near
    the model's, random advantages."""
    batch, prompt, completion = 4, 5, 7
    prompt_ids = torch.randint(3, 200, (batch, prompt), generator=g)
    completion_ids = torch.randint(3, 200, (batch, completion), generator=g)
    completion_mask = torch.ones(batch, completion, dtype=torch.long)
    completion_mask[1, 4:] = 0
    completion_mask[3, 2:] = 0
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([prompt_ids, completion_ids], 1),
            torch.cat([torch.ones_like(prompt_ids), completion_mask], 1), completion)
    return {"prompt_ids": prompt_ids, "prompt_mask": torch.ones_like(prompt_ids), "completion_ids": completion_ids,
            "completion_mask": completion_mask, "advantages": torch.randn(batch, generator=g),
            "old_per_token_logps": logps + 0.05 * torch.randn(logps.shape, generator=g),
            "ref_per_token_logps": logps + 0.1 * torch.randn(logps.shape, generator=g),
            "num_items_in_batch": completion_mask.sum().float()}
