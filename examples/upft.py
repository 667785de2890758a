"""UPFT (unsupervised prefix fine-tuning) vs fine-tuning on full self-generated traces, on SmolLM2-135M-Instruct and
arithmetic word problems made up here (no labels are used for training: only the model's own sampled traces).

Both runs start from the same model and the same sampled traces (one per prompt, cached under --cache-dir so a
rerun does not sample again): UPFT trains on the first --k tokens of each trace (the structure ratio keeping a few
whole), the baseline on the whole traces. Training uses HF Trainer, fastft.methods.upft's collator and fastft's
fused causal-LM loss; the script prints the labelled tokens trained, the training time and the held-out answer
accuracy (greedy decoding, last number of the answer) of the base model and of both runs.

    python examples/upft.py                       # small defaults: a few minutes on 2 CPU cores
    python examples/upft.py --train 300 --eval 100 --max-new-tokens 160 --epochs 2
"""

import argparse
import copy
import random
import re
import tempfile
import time

import torch
from transformers import Trainer, TrainingArguments

import fastft
from fastft.methods.upft import UPFTCollator, UPFTConfig, prompt_ids, sample_traces, structure_examples, upft_example

NAMES = ("Tom", "Ana", "Li", "Sara", "Omar", "Mia")
ITEMS = ("apples", "pencils", "stickers", "books", "marbles")


def word_problems(count: int, seed: int) -> list[tuple[str, int]]:
    """(question, answer) pairs: sums, differences and products of small numbers in a sentence."""
    rng = random.Random(seed)
    problems = []
    for _ in range(count):
        name, item, a, b = rng.choice(NAMES), rng.choice(ITEMS), rng.randint(2, 30), rng.randint(2, 12)
        kind = rng.randrange(3)
        if kind == 0:
            question, answer = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?", a + b
        elif kind == 1:
            a += b
            question, answer = f"{name} has {a} {item} and gives away {b}. How many {item} are left?", a - b
        else:
            question, answer = f"{name} buys {b} bags with {a} {item} in each. How many {item} is that?", a * b
        problems.append((question + " Answer with the number at the end.", answer))
    return problems


def load(tiny: bool):
    from fastft.bench.smollm2 import load_smollm2, smollm2_checkpoint

    if not tiny:
        return load_smollm2()
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_checkpoint())
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=512, eos_token_id=tokenizer.eos_token_id))
    return model.eval(), tokenizer


def accuracy(model, tokenizer, problems, max_new_tokens: int, batch_size: int = 16) -> float:
    model.eval()
    correct = 0
    pad = tokenizer.pad_token_id
    for start in range(0, len(problems), batch_size):
        chunk = problems[start:start + batch_size]
        ids = [prompt_ids(tokenizer, q) for q, _ in chunk]
        width = max(map(len, ids))
        batch = torch.tensor([[pad] * (width - len(i)) + i for i in ids])
        mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
        with torch.no_grad():
            out = model.generate(input_ids=batch, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=pad)
        for row, (_, answer) in zip(tokenizer.batch_decode(out[:, width:], skip_special_tokens=True), chunk):
            numbers = re.findall(r"-?\d+", row.replace(",", ""))
            correct += bool(numbers) and int(numbers[-1]) == answer
    return correct / len(problems)


def train(model, tokenizer, examples, args) -> float:
    fastft.patch(model, fused_loss=True)
    with tempfile.TemporaryDirectory() as out:
        training = TrainingArguments(output_dir=out, per_device_train_batch_size=args.batch, learning_rate=args.lr,
                                     num_train_epochs=args.epochs, lr_scheduler_type="constant", report_to=[],
                                     save_strategy="no", logging_steps=10**6, disable_tqdm=True, use_cpu=True,
                                     train_sampling_strategy="group_by_length", remove_unused_columns=False, seed=0)
        trainer = Trainer(model=model, args=training, train_dataset=examples,
                          data_collator=UPFTCollator(tokenizer.pad_token_id))
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    fastft.unpatch(model)
    return seconds


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=64, help="unlabeled training prompts")
    parser.add_argument("--eval", type=int, default=32, help="held-out problems")
    parser.add_argument("--k", type=int, default=16, help="prefix tokens kept and trained (UPFT)")
    parser.add_argument("--structure-ratio", type=float, default=0.1)
    parser.add_argument("--max-new-tokens", type=int, default=96, help="length of the sampled traces")
    parser.add_argument("--eval-tokens", type=int, default=64, help="new tokens generated per held-out answer")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--cache-dir", default="upft-cache")
    parser.add_argument("--tiny", action="store_true", help="a random 2-layer model (tests), not SmolLM2")
    args = parser.parse_args(argv)

    model, tokenizer = load(args.tiny)
    problems = word_problems(args.train + args.eval, seed=0)
    train_problems, held_out = problems[:args.train], problems[args.train:]
    config = UPFTConfig(prefix_tokens=args.k, structure_ratio=args.structure_ratio, max_new_tokens=args.max_new_tokens)
    prompts = [prompt_ids(tokenizer, q) for q, _ in train_problems]
    # One sampled trace per prompt serves both runs; UPFT alone would sample only k tokens for most prompts
    # (fastft.methods.upft.build_upft_dataset does).
    traces = sample_traces(model, tokenizer, prompts, [args.max_new_tokens] * len(prompts), config, args.cache_dir)
    full = structure_examples(len(prompts), config)
    datasets = {
        "UPFT": [upft_example(p, t, len(t) if i in full else args.k) for i, (p, t) in enumerate(zip(prompts, traces))],
        "full traces": [upft_example(p, t, len(t)) for p, t in zip(prompts, traces)],
    }
    results = {"base model": {"tokens": 0, "seconds": 0.0,
                              "accuracy": accuracy(model, tokenizer, held_out, args.eval_tokens)}}
    for name, examples in datasets.items():
        trained = copy.deepcopy(model)
        seconds = train(trained, tokenizer, examples, args)
        tokens = sum(sum(label != -100 for label in e["labels"]) for e in examples) * args.epochs
        results[name] = {"tokens": int(tokens), "seconds": seconds,
                         "accuracy": accuracy(trained, tokenizer, held_out, args.eval_tokens)}
    print(f"\n{args.train} training prompts (unlabeled), {args.eval} held-out problems, k={args.k}, "
          f"structure ratio {args.structure_ratio}, traces of up to {args.max_new_tokens} tokens")
    print(f"{'run':<12} {'labelled tokens trained':>24} {'train time s':>13} {'held-out accuracy':>18}")
    for name, r in results.items():
        print(f"{name:<12} {r['tokens']:>24} {r['seconds']:>13.1f} {r['accuracy']:>18.1%}")
    return results


if __name__ == "__main__":
    main()
