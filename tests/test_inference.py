"""The inference core (llmctl/inference/), pinned once for every caller (generate, serve's
engine, eval's generations, explain): the stop rule and its hold-back, incremental
detokenization, logprobs, and the context and BOS rules."""

from __future__ import annotations

import random

import pytest

from conftest import sentences, train_tiny_tokenizer
from llmctl.inference.context import context_length, encode, fit_to_context, room
from llmctl.inference.stops import cut_at_stop, find_stop, held_back, release

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """A byte-level BPE that splits accented and CJK characters across tokens."""
    texts = ["café naïve déjà vu 日本語のテキスト über straße " + s for s in sentences(120, seed=5)]
    return train_tiny_tokenizer(texts, tmp_path_factory.mktemp("tok"), vocab_size=300)


# ---- stops -------------------------------------------------------------------------------------
def test_stop_cuts_before_the_earliest_stop_string():
    assert cut_at_stop("abc\ndef END x", ["END", "\n"]) == ("abc", True)
    assert cut_at_stop("abc", ["", "z"]) == ("abc", False)  # empty stop strings are ignored
    assert find_stop("aXbX", ["X"], start=2) == 3


def test_hold_back_keeps_what_could_become_a_stop_string():
    assert held_back("hello EN", ["END"]) == 2
    assert held_back("hello E", ["END", "Eve"]) == 1
    assert held_back("hello", ["END"]) == 0
    assert held_back("caf\ufffd", []) == 1  # half a character waits for the next token


@pytest.mark.parametrize("seed", range(5))
def test_streamed_release_sends_exactly_the_cut_text(seed):
    """Text growing piece by piece, released by `release`: what is sent never has to be taken
    back, and at the end equals the whole text cut at its first stop string."""
    rng = random.Random(seed)
    stops = ["<END>", "\n\n"]
    text = "".join(rng.choice(["a", "b", "<", "<E", "ND>", "\n", " "]) for _ in range(60))
    sent, seen, grown, stopped = "", 0, "", False
    while grown != text and not stopped:
        grown = text[: len(grown) + rng.randint(1, 4)]
        n, stopped = release(grown, stops, seen, final=grown == text)
        assert grown[: len(sent)] == sent and n >= len(sent)
        sent, seen = grown[:n], len(grown)
    assert (sent, stopped) == cut_at_stop(text, stops)


# ---- detok -------------------------------------------------------------------------------------
def _stream(tok, ids):
    from llmctl.inference.detok import step

    text, prefix, read, ends = "", 0, 0, []
    for i in range(len(ids)):
        delta, prefix, read = step(tok, ids[: i + 1], prefix, read, final=i == len(ids) - 1)
        assert "\ufffd" not in delta or i == len(ids) - 1  # half a character is never streamed early
        text += delta
        ends.append(len(text))
    return text, ends


def test_incremental_text_equals_a_full_decode(tok):
    """A character split across tokens, and a special token (no text) in the middle: token by
    token, the text is the full decode's; cut mid-character, the last token hands out the
    half character as the full decode does."""
    from llmctl.inference.detok import TokenPieces, text_ends

    plain = tok("déjà vu 日本語 über", add_special_tokens=False)["input_ids"]
    pieces = TokenPieces(tok)
    assert any(len(pieces.bytes(t)) == 1 and pieces.bytes(t)[0] >= 0x80 for t in plain)  # a split character
    half = tok("日本", add_special_tokens=False)["input_ids"][:-1]
    for ids in (plain, plain[:3] + [tok.pad_token_id] + plain[3:], half):
        text, ends = _stream(tok, ids)
        assert text == tok.decode(ids, skip_special_tokens=True)
        assert text_ends(tok, ids, text, pieces.bytes) == ends  # offsets found once, at the end
    assert _stream(tok, half)[0].endswith("\ufffd")


def test_text_stream_stops_at_a_stop_string(tok):
    from llmctl.inference.detok import TextStream

    out = []

    class Collect(TextStream):
        def on_finalized_text(self, text, stream_end=False):
            out.append((text, stream_end))

    ids = tok("déjà vu STOP über", add_special_tokens=False)["input_ids"]
    s = Collect(tok, ["STOP"])
    s.put(torch.tensor([[1, 2]]))  # the prompt: skipped
    for t in ids:
        s.put(torch.tensor([t]))
    s.end()
    assert "".join(t for t, _ in out) == "déjà vu " and [e for _, e in out].count(True) == 1 and out[-1][1]


# ---- logprobs ----------------------------------------------------------------------------------
def test_logprobs_top_k_and_text_offsets(tok):
    from llmctl.inference.logprobs import entropy, entry, prompt_entries, sampled, token_logprobs

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g) * 3
    lp = torch.log_softmax(logits, dim=-1)
    tokens = [4, 17, 49]
    got = sampled(logits, tokens, [2, 0, 5])
    for r, (t, k) in enumerate(zip(tokens, [2, 0, 5])):
        want_lp, want_top = entry(lp[r], t, k)
        assert got[r][0] == pytest.approx(want_lp, abs=1e-5)
        assert [i for i, _ in got[r][1]] == [i for i, _ in want_top] == lp[r].argsort(descending=True)[:k].tolist()
        assert [v for _, v in got[r][1]] == pytest.approx([v for _, v in want_top], abs=1e-5)
    assert entropy(lp[0]) == pytest.approx(float(-(lp[0].exp() * lp[0]).sum()), abs=1e-5)
    assert entropy(torch.log_softmax(torch.tensor([0.0, float("-inf")]), -1)) == 0.0  # masked entries add nothing

    ids = tok("déjà vu über", add_special_tokens=False)["input_ids"]
    rows = torch.log_softmax(torch.randn(len(ids) - 1, len(tok), generator=g), dim=-1)
    entries = prompt_entries(tok.decode, ids, None, rows, 1)
    assert entries[0] == (ids[0], None, [], 0)
    assert [e[3] for e in entries] == [len(tok.decode(ids[:m])) for m in range(len(ids))]
    assert [e[1] for e in entries[1:]] == pytest.approx([float(rows[m - 1, ids[m]]) for m in range(1, len(ids))])

    # generate's records: tokens past a stop-string cut (not in the text) are left out
    ids = tok("the quick brown fox", add_special_tokens=False)["input_ids"]
    assert len(ids) > 2
    text = tok.decode(ids[:2], skip_special_tokens=True)
    recs = token_logprobs(tok, ids, torch.randn(len(ids), len(tok), generator=g), text, 2)
    assert [r["id"] for r in recs] == ids[:2] and all(len(r["top"]) == 2 for r in recs)


# ---- context -----------------------------------------------------------------------------------
def test_truncation_keeps_bos_and_leaves_room_for_new_tokens():
    bos = 1
    kept, new, cut = fit_to_context([[bos] + list(range(10, 50))], 8, 32, bos=bos)
    assert kept[0][0] == bos and len(kept[0]) == 24 and kept[0][1:] == list(range(27, 50)) and new == 8 and cut == [17]
    kept, _, _ = fit_to_context([[bos] + list(range(10, 50))], 8, 32)  # no BOS rule: cut like any token
    assert kept[0] == list(range(26, 50))
    assert room(32, 30) == 2 and room(None, 30) is None


def test_prompts_open_with_bos_exactly_when_the_tokenizer_adds_it(tok):
    from types import SimpleNamespace

    ids, want = encode(tok, ["the quick", "fox"])
    assert not want and ids == [tok("the quick")["input_ids"], tok("fox")["input_ids"]]
    assert context_length(SimpleNamespace(config=SimpleNamespace(n_positions=64))) == 64
    assert context_length(SimpleNamespace(config=SimpleNamespace())) is None


@pytest.mark.parametrize("lean", ["1", "0"])
def test_generate_streams_the_text_it_returns(tok, monkeypatch, lean):
    """generate's terminal stream (TextStream) on the lean loop and on transformers' generate:
    the streamed pieces join to the returned text, which ends before the stop string."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmctl.generation import Sampling, generate_batch
    from llmctl.inference.detok import TextStream

    monkeypatch.setenv("LLMCTL_LEAN", lean)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                         max_position_embeddings=128, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                                         initializer_range=0.3)).eval()
    model.generation_config.eos_token_id = None
    full = generate_batch(model, tok, ["the cat"], Sampling(max_new_tokens=30))[0]["text"]
    stop = full[10:12]
    out = []

    class Collect(TextStream):
        def on_finalized_text(self, text, stream_end=False):
            out.append((text, stream_end))

    res = generate_batch(model, tok, ["the cat"], Sampling(max_new_tokens=30, stop=(stop,)), streamer=Collect(tok, (stop,)))[0]
    assert res["finish_reason"] == "stop" and res["text"] == full[: full.index(stop)]
    assert "".join(t for t, _ in out) == res["text"] and [e for _, e in out].count(True) == 1
