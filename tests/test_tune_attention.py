"""tune's student attends in bf16 while it trains on a GPU (``tune_attention``): the float32
sdpa with grouped key/value heads falls to PyTorch's math kernel, which keeps each head's
``[T, T]`` weights for the backward."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from quantkit.tune_attention import NAME, use_training_attention


def _llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=32, vocab_size=300, num_hidden_layers=2, attn_implementation="sdpa")
    return LlamaForCausalLM(config).float()


def test_the_attention_takes_bf16_in_training_and_float32_in_evaluation(monkeypatch):
    """What sdpa is handed: bf16 query, key and value (and mask) while the model trains, its
    output back in float32; the model's own float32 attention in eval mode, bit for bit."""
    from transformers.integrations import sdpa_attention

    model = _llama()
    ids = torch.randint(0, 300, (2, 24))
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, :5] = 0  # left padding: transformers hands sdpa a mask
    reference_eval = model.eval()(ids, attention_mask=mask).logits
    reference_train = model.train()(ids, attention_mask=mask).logits

    use_training_attention(model, torch.bfloat16)
    assert model.config._attn_implementation == NAME
    seen, forward = [], sdpa_attention.sdpa_attention_forward

    def spy(module, query, key, value, attention_mask, **kwargs):
        seen.append((query.dtype, key.dtype, value.dtype, None if attention_mask is None else attention_mask.dtype))
        return forward(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward", spy)
    trained = model.train()(ids, attention_mask=mask).logits
    assert seen and all(s[:3] == (torch.bfloat16,) * 3 and s[3] in (None, torch.bool, torch.bfloat16) for s in seen)
    assert trained.dtype == torch.float32
    real = mask.bool()  # a padded position attends to nothing, and its logits mean nothing
    err = (trained[real] - reference_train[real]).abs().max() / reference_train[real].abs().max()
    assert 0 < err < 2e-2, err  # bf16's rounding of the attention's inputs, no more
    trained.sum().backward()
    assert model.model.layers[0].input_layernorm.weight.grad.abs().sum() > 0

    seen.clear()
    assert torch.equal(model.eval()(ids, attention_mask=mask).logits, reference_eval)
    assert seen and all(s[0] == torch.float32 for s in seen)


@pytest.mark.parametrize("products,implementation", [(torch.float32, "sdpa"), (torch.bfloat16, "eager")])
def test_float32_products_and_other_attention_implementations_are_left_alone(products, implementation):
    model = _llama()
    model.set_attn_implementation(implementation)
    use_training_attention(model, products)
    assert model.config._attn_implementation == implementation


def test_a_sliding_window_model_keeps_its_window_in_training():
    """Gemma 3's sliding-window layers get their masks in the bf16 attention too: without them
    they would attend to every earlier token, far beyond bf16's rounding."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                              head_dim=32, vocab_size=300, num_hidden_layers=2, sliding_window=8,
                              layer_types=["sliding_attention", "full_attention"], attn_implementation="sdpa")
    model = Gemma3ForCausalLM(config).float()
    ids = torch.randint(0, 300, (2, 40))  # five windows long
    reference = model.train()(ids).logits
    use_training_attention(model, torch.bfloat16)
    assert model.config._attn_implementation == NAME
    trained = model.train()(ids).logits
    err = (trained - reference).abs().max() / reference.abs().max()
    assert 0 < err < 2e-2, err
