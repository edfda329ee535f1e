"""The KV cache: explicit per-layer lengths, crop as rollback, loud errors instead of stale reads."""
import pytest
import torch

from model import CacheError, KVCache, positions
from model.cache import CHUNK


@pytest.fixture(scope="module")
def model(pair):
    return pair[1]


def ids_(model, n, seed=0):
    return torch.randint(0, model.cfg.vocab_size, (1, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_writing_past_max_len_raises(model):
    cache = KVCache.for_model(model.cfg, 1, 8)
    model(ids_(model, 6), cache=cache)
    with pytest.raises(CacheError, match=r"holds 8 positions; asked to write slots \[6, 9\)"):
        model(ids_(model, 3), cache=cache, start=6)


@torch.no_grad()
def test_a_layer_that_was_skipped_cannot_attend_over_its_gap(model):
    cache = KVCache.for_model(model.cfg, 1, 16)
    x = ids_(model, 8)
    model(x, cache=cache)
    # the next token runs layers [0, 2) only; the other layers keep their 8 valid slots
    pos = positions(None, 8, 1)
    h = model.run_layers(model.embed_tokens(x[:, :1], pos), pos, layers=range(2), cache=cache, start=8)
    assert cache.lengths == [9, 9] + [8] * (model.cfg.n_layers - 2)
    with pytest.raises(CacheError, match="layer 2 holds 8 valid positions; cannot write at slot 9"):
        pos = positions(None, 9, 1)
        model.run_layers(h, pos, layers=[2], cache=cache, start=9)


@torch.no_grad()
def test_crop_rolls_back_a_rejected_draft(model):
    x = ids_(model, 12, seed=1)
    cache = KVCache.for_model(model.cfg, 1, 16)
    model(x[:, :8], cache=cache)
    expected = model(x[:, 8:12], cache=cache, start=8)
    model(torch.zeros(1, 3, dtype=torch.long), cache=cache, start=12)  # a draft that gets rejected
    cache.crop(8)
    assert cache.lengths == [8] * model.cfg.n_layers
    assert torch.equal(model(x[:, 8:12], cache=cache, start=8), expected)


def test_start_without_cache_raises(model):
    with pytest.raises(CacheError, match="needs a cache"):
        pos = positions(None, 3, 1)
        model.run_layers(model.embed_tokens(ids_(model, 1), pos), pos, start=3)


def test_the_cache_grows_in_chunks_as_it_is_used_not_to_its_bound(model):
    cfg = model.cfg
    cache = KVCache.for_model(cfg, 1, 10**9)  # a bound that could never be allocated
    assert cache.k.numel() == 0
    kv = torch.randn(1, cfg.n_kv_heads, CHUNK + 5, cfg.head_dim)  # (B, n_kv, T, hd)
    k, v = cache.write(0, 0, kv[:, :, :5], kv[:, :, :5])
    assert cache.k.shape[3] == CHUNK and torch.equal(k, kv[:, :, :5])
    k, v = cache.write(0, 5, kv[:, :, 5:], -kv[:, :, 5:])  # crosses a chunk: earlier slots are kept
    assert cache.k.shape[3] == 2 * CHUNK and torch.equal(k, kv) and torch.equal(v[:, :, :5], kv[:, :, :5])
