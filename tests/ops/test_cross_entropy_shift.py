"""fused_linear_cross_entropy scores row i against labels[i]: a causal LM's loss needs the caller's shift (the
docstring's example), and without it the loss is a different quantity."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fastft.losses import fused_linear_cross_entropy


def test_the_documented_shift_gives_the_models_loss():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    ids = torch.randint(0, 256, (2, 16))
    expected = model(input_ids=ids, labels=ids).loss
    hidden = model.model(input_ids=ids).last_hidden_state
    shifted = fused_linear_cross_entropy(hidden[:, :-1], model.lm_head.weight, ids[:, 1:])
    assert abs(shifted.item() - expected.item()) <= 1e-5 * expected.item()
    # without the shift: each position scored against its own token, another quantity
    unshifted = fused_linear_cross_entropy(hidden, model.lm_head.weight, ids)
    own_token = torch.nn.functional.cross_entropy(model.lm_head(hidden).flatten(0, 1), ids.flatten())
    assert abs(unshifted.item() - own_token.item()) <= 1e-5 * own_token.item()
    assert abs(unshifted.item() - expected.item()) > 1e-3 * expected.item()
