"""The KV-cache helper: crop semantics of this transformers release, and per-row compaction."""

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from pipeline.decode import kvcache


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def _prefill(model, ids):
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, cache=cache, use_cache=True)
    return cache


def _same(a, b, n=None):
    for la, lb in zip(a.layers, b.layers, strict=True):
        ka, kb = la.keys, lb.keys
        if n is not None:
            ka, kb = ka[..., :n, :], kb[..., :n, :]
        assert ka.shape == kb.shape
        torch.testing.assert_close(ka, kb, atol=1e-5, rtol=0)


def test_drop_last_and_crop(model):
    ids = torch.randint(0, 64, (1, 10))
    full = _prefill(model, ids)
    assert kvcache.cache_len(full) == 10
    kvcache.drop_last(full, 0)  # no-op
    assert kvcache.cache_len(full) == 10
    kvcache.drop_last(full, 3)
    assert kvcache.cache_len(full) == 7
    _same(full, _prefill(model, ids[:, :7]))
    kvcache.crop_cache(full, 4)
    assert kvcache.cache_len(full) == 4
    _same(full, _prefill(model, ids[:, :4]))
    kvcache.crop_cache(full, 4)  # keeping everything is a no-op
    assert kvcache.cache_len(full) == 4


def test_crop_then_extend_is_exact(model):
    """Feed tokens + junk, drop the junk, continue: equals a fresh prefill of the real tokens."""
    ids = torch.randint(0, 64, (1, 12))
    cache = _prefill(model, ids[:, :6])
    with torch.no_grad():
        model(input_ids=torch.cat([ids[:, 6:9], torch.full((1, 4), 5)], 1), cache=cache, use_cache=True)
    kvcache.drop_last(cache, 4)
    with torch.no_grad():
        model(input_ids=ids[:, 9:], cache=cache, use_cache=True)
    _same(cache, _prefill(model, ids))


def test_invalid_arguments(model):
    cache = _prefill(model, torch.randint(0, 64, (1, 5)))
    with pytest.raises(ValueError):
        kvcache.drop_last(cache, -1)
    with pytest.raises(ValueError):
        kvcache.drop_last(cache, 6)
    with pytest.raises(ValueError):
        kvcache.crop_cache(cache, 6)
    assert kvcache.cache_len(None) == 0


def test_select_and_compact_rows(model):
    ids = torch.randint(0, 64, (3, 8))
    cache = _prefill(model, ids)
    ref = [layer.keys.clone() for layer in cache.layers]
    valid = torch.tensor([[1, 1, 0, 1, 0, 0, 1, 0],
                          [0, 1, 1, 1, 1, 1, 0, 0],
                          [1, 0, 0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    new_valid = kvcache.compact_rows(cache, valid)
    assert new_valid.shape == (3, 5) and kvcache.cache_len(cache) == 5
    assert new_valid.sum(1).tolist() == [4, 5, 2]
    assert not new_valid[0, 0] and new_valid[0, 1:].all()
    for layer, r in zip(cache.layers, ref, strict=True):
        for b in range(3):
            torch.testing.assert_close(layer.keys[b][:, new_valid[b]], r[b][:, valid[b]])
        assert torch.isfinite(layer.keys).all() and torch.isfinite(layer.values).all()
    kvcache.select_rows(cache, torch.tensor([2, 0]))
    assert cache.layers[0].keys.shape[0] == 2
    torch.testing.assert_close(cache.layers[0].keys[1][:, new_valid[0]], ref[0][0][:, valid[0]])


def test_raw_crop_api_of_this_transformers(model):
    """What kvcache relies on (transformers 5.24): crop(-n) drops n, crop(0) is a no-op, crop(+n) raises.
    If an upgrade changes this, fix kvcache.drop_last and this test together."""
    cache = _prefill(model, torch.randint(0, 64, (1, 6)))
    cache.crop(-2)
    assert cache.get_seq_length() == 4
    cache.crop(0)
    assert cache.get_seq_length() == 4
    with pytest.raises(ValueError):
        cache.crop(3)
