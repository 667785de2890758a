"""fastft.methods.domain_adaptation on a tiny random Llama: the domain loss reaches the model reversed and scaled
by the DANN schedule, the classifier unreversed; domain adapters switch per batch; bad input."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import rel_error
from fastft.methods import adapters
from fastft.methods.domain_adaptation import DANNConfig, dann_step
from fastft.nn import DomainClassifier
from fastft.nn.domain import mean_pool

VOCAB = 128


def tiny_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def batch(seed, labels=True):
    ids = torch.randint(0, VOCAB, (3, 8), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    return {**out, "labels": ids} if labels else out


def test_domain_gradient_is_reversed_and_scaled_by_the_schedule():
    model = tiny_llama()
    classifier = DomainClassifier(64, width=16)
    source, target = batch(1), batch(2, labels=False)
    out = dann_step(model, classifier, source, target, progress=0.3, config=DANNConfig(domain_weight=0.5))
    lam = 2 / (1 + math.exp(-3.0)) - 1
    assert abs(out.lam - lam) < 1e-12
    params = [model.model.layers[1].mlp.down_proj.weight, classifier.mlp[0].weight]
    got = torch.autograd.grad(out.domain_loss, params)
    # the same loss without reversal
    hidden = [model(**{k: v for k, v in b.items() if k != "labels"}, output_hidden_states=True).hidden_states[-1]
              for b in (source, target)]
    logits = torch.cat([classifier.mlp(mean_pool(h, b["attention_mask"])) for h, b in zip(hidden, (source, target))])
    plain = F.cross_entropy(logits, torch.tensor([0, 0, 0, 1, 1, 1]))
    expected = torch.autograd.grad(plain, params)
    assert rel_error(out.domain_loss, plain) < 1e-6
    assert rel_error(got[0], -lam * expected[0]) < 1e-5
    assert rel_error(got[1], expected[1]) < 1e-5
    assert rel_error(out.loss, out.task_loss + 0.5 * out.domain_loss) < 1e-7


def test_domain_adapters_switch_per_batch():
    model = tiny_llama()
    for name in ("news", "reviews"):
        adapters.add_adapters(model, adapters.AdapterConfig(bottleneck_size=8, init="default"), name=name,
                              activate=False)
    seen = []
    slot = model.model.layers[0].mlp.down_proj.fastft_adapters
    original_run = slot.run
    slot.run = lambda output, source: (seen.append(list(slot.active)), original_run(output, source))[1]
    config = DANNConfig(source_domain="news", target_domain="reviews")
    out = dann_step(model, DomainClassifier(64, width=16), batch(1), batch(2, False), progress=1.0, config=config)
    assert seen == [["news"], ["reviews"]]
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if "fastft_adapters" in n}
    assert all(g is not None for g in grads.values())  # both domains' adapters trained by their own batch
    assert all(g.abs().sum() > 0 for n, g in grads.items() if ".up." in n)  # (up starts at zero: down gets 0)


def test_bad_input():
    with pytest.raises(ValueError, match="source batch must carry labels"):
        dann_step(tiny_llama(), DomainClassifier(64), batch(1, False), batch(2, False), 0.5)
    with pytest.raises(ValueError, match="progress must be a finite real number in"):
        dann_step(tiny_llama(), DomainClassifier(64), batch(1), batch(2, False), 2.0)
    with pytest.raises(ValueError, match="source_domain and target_domain"):
        DANNConfig(source_domain="a")
    with pytest.raises(ValueError, match="num_domains must be >= 2"):
        DomainClassifier(64, num_domains=1)
