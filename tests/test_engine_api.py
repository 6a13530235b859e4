"""What the serving engine (llmctl/server/engine.py) relies on from transformers, pinned.

The engine keeps one KV cache for the running batch and edits it in place: rows join (the
shorter cache is left-padded in time and the rows are stacked), rows leave
(`batch_select_indices`), and leading columns no row uses are cut. Those edits go through
these transformers APIs; an upgrade that changes one fails here with its name, not as wrong
tokens in `llmctl serve`:

- the forward keyword for the cache: `cache` (transformers >= 5.2x) or `past_key_values`;
- the forward keyword `logits_to_keep` (prefill computes only the last position's logits);
- the output's cache: `out.cache` or `out.past_key_values`;
- `cache.layers`: a list of `transformers.cache_utils.DynamicLayer` (exact type), each with
  `is_initialized`, and `.keys` / `.values` tensors shaped [batch, kv_heads, time, head_dim]
  that the engine reads and reassigns (padded, stacked, sliced) and the next forward uses;
- `cache.batch_select_indices(index_tensor)`: keeps those rows of every layer.
"""

from __future__ import annotations

import inspect

import pytest

torch = pytest.importorskip("torch")

ENGINE = "llmctl/server/engine.py"


def _api(name: str, what: str) -> str:
    import transformers

    return f"transformers {transformers.__version__} changed {name}, which {ENGINE} relies on: {what}"


def _model(arch: str):
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    torch.manual_seed(0)
    if arch == "llama":
        cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=64)
    else:
        cfg = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return AutoModelForCausalLM.from_config(cfg).eval()


def _kv_heads_and_dim(model) -> tuple[int, int]:
    c = model.config
    heads = c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    return kv, c.hidden_size // heads


def _cache_kw(model) -> str:
    params = inspect.signature(model.forward).parameters
    assert "cache" in params or "past_key_values" in params, _api(
        "the forward keyword for the KV cache", f"one of 'cache' / 'past_key_values' in {model.__class__.__name__}.forward{tuple(params)}")
    return "cache" if "cache" in params else "past_key_values"


def _cache_of(out):
    c = getattr(out, "cache", None)
    c = c if c is not None else getattr(out, "past_key_values", None)
    assert c is not None, _api("the forward output's cache", "out.cache or out.past_key_values (use_cache=True)")
    return c


def _prefill(model, rows: list[list[int]]):
    """Left-padded prefill, as the engine does it."""
    n = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), n), dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, n - len(r):] = torch.tensor(r)
        mask[i, n - len(r):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    return _cache_of(out), mask, pos[:, -1] + 1, out.logits


def _step(model, cache, mask, pos, tokens: list[int]):
    B = len(tokens)
    mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype)], dim=1)
    with torch.inference_mode():
        out = model(input_ids=torch.tensor(tokens).view(B, 1), attention_mask=mask, position_ids=pos.view(B, 1),
                    use_cache=True, **{_cache_kw(model): cache})
    return _cache_of(out), mask, pos + 1, out.logits[:, -1, :]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_forward_keywords_and_output(arch):
    model = _model(arch)
    params = inspect.signature(model.forward).parameters
    _cache_kw(model)
    assert "logits_to_keep" in params, _api("the forward keyword 'logits_to_keep'", f"present in {model.__class__.__name__}.forward")
    cache, mask, pos, logits = _prefill(model, [[1, 2, 3, 4, 5], [6, 7, 8]])
    assert tuple(logits.shape) == (2, 1, 64), _api("logits_to_keep=1", f"logits of the last position only, got {tuple(logits.shape)}")
    cache, mask, pos, logits = _step(model, cache, mask, pos, [9, 10])
    assert tuple(logits.shape) == (2, 64)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_cache_layers_are_dynamic_layers_with_keys_and_values(arch):
    from transformers.cache_utils import DynamicLayer

    model = _model(arch)
    cache, *_ = _prefill(model, [[1, 2, 3, 4, 5], [6, 7, 8]])
    layers = getattr(cache, "layers", None)
    assert isinstance(layers, list) and len(layers) == 2, _api(f"{type(cache).__name__}.layers", "a list with one entry per decoder layer")
    kv, hd = _kv_heads_and_dim(model)
    for layer in layers:
        assert type(layer) is DynamicLayer, _api("the cache's layer type", f"transformers.cache_utils.DynamicLayer, got {type(layer).__name__}")
        assert getattr(layer, "is_initialized", None) is True, _api("DynamicLayer.is_initialized", "True once the layer holds keys and values")
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            assert isinstance(t, torch.Tensor), _api(f"DynamicLayer.{name}", "a tensor attribute")
            assert tuple(t.shape) == (2, kv, 5, hd), _api(f"DynamicLayer.{name}", f"shape [batch, kv_heads, time, head_dim] = (2, {kv}, 5, {hd}), got {tuple(t.shape)}")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batch_select_indices_keeps_rows(arch):
    model = _model(arch)
    cache, *_ = _prefill(model, [[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    before = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
    assert callable(getattr(cache, "batch_select_indices", None)), _api(f"{type(cache).__name__}.batch_select_indices", "a method")
    cache.batch_select_indices(torch.tensor([0, 2]))
    for layer, (k, v) in zip(cache.layers, before):
        assert torch.equal(layer.keys, k[[0, 2]]) and torch.equal(layer.values, v[[0, 2]]), _api(
            "DynamicCache.batch_select_indices(index)", "keeps exactly those rows of every layer's keys/values")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_edited_keys_and_values_are_what_the_next_forward_uses(arch):
    """The engine's merge and trim: reassigned (left-padded, stacked, sliced) tensors are used as they are."""
    import torch.nn.functional as F

    model = _model(arch)
    a, b = [1, 2, 3, 4, 5, 6], [7, 8, 9]
    # Reference: each row alone.
    ref = []
    for row, nxt in ((a, 11), (b, 12)):
        cache, mask, pos, _ = _prefill(model, [row])
        ref.append(_step(model, cache, mask, pos, [nxt])[3][0])
    # The engine's merge: prefill separately, left-pad the shorter cache in time, stack rows.
    ca, ma, pa, _ = _prefill(model, [a])
    cb, mb, pb, _ = _prefill(model, [b])
    T = ma.shape[1]
    pad = T - mb.shape[1]
    for la, lb in zip(ca.layers, cb.layers):
        la.keys = torch.cat([la.keys, F.pad(lb.keys, (0, 0, pad, 0))], dim=0)
        la.values = torch.cat([la.values, F.pad(lb.values, (0, 0, pad, 0))], dim=0)
    mask = torch.cat([ma, F.pad(mb, (pad, 0))], dim=0)
    _, _, _, logits = _step(model, ca, mask, torch.cat([pa, pb]), [11, 12])
    for i in range(2):
        assert torch.allclose(logits[i], ref[i], atol=1e-4), _api(
            "DynamicLayer.keys/values assignment", "a forward with a cache whose keys/values were reassigned (left-padded and stacked) uses them as given")
    # The engine's trim: cut leading columns no row uses.
    cb, mb, pb, _ = _prefill(model, [b])
    for layer in cb.layers:
        layer.keys = F.pad(layer.keys, (0, 0, 2, 0))[:, :, 2:]
        layer.values = F.pad(layer.values, (0, 0, 2, 0))[:, :, 2:]
    _, _, _, logits = _step(model, cb, mb, pb, [12])
    assert torch.allclose(logits[0], ref[1], atol=1e-4), _api("DynamicLayer.keys/values slicing", "a time-sliced cache is used as given")
