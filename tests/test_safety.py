"""Safety rails: detectors (recall and false positives), deny lists, actions, the streaming
guard, the audit log, the HTTP layer (through the official openai client), generate, the
red-team eval and the safe defaults."""

from __future__ import annotations

import asyncio
import json
import random
import re
import threading
from pathlib import Path

import pytest

from conftest import REPO, invoke_cli, write_config

FIXTURES = Path(__file__).parent / "fixtures"

# Positives per kind: realistic, but fake (documentation examples, test card numbers); shared
# with bench/safety.py, which measures recall on the same examples.
POSITIVES = json.loads((FIXTURES / "safety_positives.json").read_text(encoding="utf-8"))["positives"]


def benign_lines() -> list[str]:
    """The benign fixture's non-empty lines after its header comment (bench/safety.py reads it the same way)."""
    lines = (FIXTURES / "benign_code.txt").read_text(encoding="utf-8").splitlines()
    while lines and lines[0].startswith("# "):
        lines.pop(0)
    return [ln for ln in lines if ln.strip()]


def _cfg(**kw):
    from llmctl.config import SafetyConfig

    return SafetyConfig.model_validate(kw)


def _rails(events: list | None = None, **kw):
    from llmctl.safety import Rails

    return Rails(_cfg(**kw), stage="test", on_event=(events.append if events is not None else None))


# --------------------------------------------------------------------------- detectors
def test_detector_recall_and_false_positives_on_benign_code():
    rails = _rails()
    table = {}
    for kind, texts in POSITIVES.items():
        hits = sum(1 for t in texts if kind in {f.kind for f in rails.scan(t, ["pii", "secrets"])})
        table[kind] = hits / len(texts)
    assert all(r >= 0.95 for r in table.values()), table
    lines = benign_lines()
    flagged = [ln for ln in lines if rails.scan(ln, ["pii", "secrets"])]
    assert len(lines) >= 100 and len(flagged) / len(lines) <= 0.02, flagged


def test_classifier_scores_sentences_and_spares_code():
    pytest.importorskip("profanity_check")
    rails = _rails(output={"classifier": "block"})
    assert rails.scan("You are a fucking idiot.", ["classifier"])
    assert not rails.scan("Kill the process and restart the server.", ["classifier"])
    lines = benign_lines()
    flagged = [ln for ln in lines if rails.scan(ln, ["classifier"])]
    assert len(flagged) / len(lines) <= 0.02, flagged
    # Segments: a profane sentence is found inside otherwise clean text.
    text = "The build passed. You are a fucking idiot. Deploy at noon."
    (f,) = rails.scan(text, ["classifier"])
    assert text[f.start:f.end].strip() == "You are a fucking idiot."


def test_deny_lists_words_phrases_regex_and_file(tmp_path):
    from llmctl.errors import ConfigError, DataError
    from llmctl.safety import DenyList

    f = tmp_path / "deny.txt"
    f.write_text("# comment\n\nforbidden fruit\nre:\\bproj-[0-9]{4}\\b\nzorp\n")
    d = DenyList.from_config(_cfg(deny={"words": ["kill"], "phrases": ["drop table"], "regex": [r"(?i)rm\s+-rf\s+/"], "file": str(f)}).deny)
    found = lambda t: sorted(x.kind for x in d.find(t))  # noqa: E731
    assert found("we KILL it") == ["word"] and found("skills and killer apps") == []
    assert found("Drop\n  Table users") == ["phrase"] and found("droptable") == []
    assert found("then rm -rf / now") == ["regex"]
    assert found("the forbidden   fruit") == ["phrase"] and found("ZORP!") == ["word"] and found("proj-1234") == ["regex"]
    assert found("proj-12345 zorped") == []
    bad = tmp_path / "bad.txt"
    bad.write_text("ok\nre:(unclosed\n")
    with pytest.raises(DataError, match=r"bad.txt:2: not a valid regular expression"):
        DenyList.from_config(_cfg(deny={"file": str(bad)}).deny)
    with pytest.raises(ConfigError, match="safety.deny.file: 'nope.txt' not found"):
        DenyList.from_config(_cfg(deny={"file": "nope.txt"}).deny)


def test_config_errors_name_the_key(tmp_path):
    from llmctl.config import load_config
    from llmctl.errors import ConfigError

    with pytest.raises(ConfigError, match=r"safety.deny.regex\[1\] '\(x' is not a valid regular expression"):
        load_config(None, ["safety.deny.regex=['ok', '(x']"])
    with pytest.raises(ConfigError, match="safety.output.classifier: the classifier scores whole sentences and cannot redact"):
        load_config(None, ["safety.output.classifier=redact"])
    with pytest.raises(ConfigError, match="safety.output.pii"):
        load_config(None, ["safety.output.pii=censor"])


# --------------------------------------------------------------------------- actions
def test_defaults_flag_pii_and_secrets_and_change_nothing():
    events: list = []
    rails = _rails(events)
    text = "mail bob@example.com the key AKIAIOSFODNN7EXAMPLE"
    assert rails.check_input(text, "r1") == text
    assert rails.check_output(text, "r1") == (text, False)
    assert {(e["rail"], e["action"]) for e in events} == {("input.pii", "flag"), ("input.secrets", "flag"), ("output.pii", "flag"), ("output.secrets", "flag")}
    assert all(e["request_id"] == "r1" for e in events)


def test_redact_block_and_events_never_hold_the_text():
    from llmctl.safety import Blocked

    events: list = []
    rails = _rails(events, input={"secrets": "block", "pii": "redact"}, output={"pii": "redact", "secrets": "block"}, refusal="[refused]")
    assert rails.check_input("write to bob@example.com please", "a") == "write to <EMAIL> please"
    with pytest.raises(Blocked) as b:
        rails.check_input("my key is AKIAIOSFODNN7EXAMPLE", "b")
    assert b.value.rail == "input.secrets" and b.value.kinds == ["secret"]
    out, blocked = rails.check_output("call +1 415 555 0132. Key: AKIAIOSFODNN7EXAMPLE and more", "c")
    assert blocked and out == "call <PHONE>. Key: [refused]"
    blob = json.dumps(events)
    assert "AKIA" not in blob and "bob@" not in blob and "555" not in blob
    assert ("output.secrets", "block") in {(e["rail"], e["action"]) for e in events}


def test_rails_disabled_do_nothing():
    events: list = []
    rails = _rails(events, enabled=False, input={"secrets": "block"}, output={"secrets": "block"})
    assert rails.check_input("AKIAIOSFODNN7EXAMPLE", "x") == "AKIAIOSFODNN7EXAMPLE"
    assert rails.check_output("AKIAIOSFODNN7EXAMPLE", "x") == ("AKIAIOSFODNN7EXAMPLE", False) and events == []


# --------------------------------------------------------------------------- streaming guard
SECRETS_TEXT = (
    "Here you go. The deploy user is ops@example.com and the key is AKIAIOSFODNN7EXAMPLE; "
    "the GitHub token ghp_1a2B3c4D5e6F7g8H9i0J1k2L3m4N5o6P7q8R is in CI. "
    "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7bq3xKq1\n-----END RSA PRIVATE KEY-----\nThat is all for today, thanks."
)
RAW = ["ops@example.com", "AKIAIOSFODNN7EXAMPLE", "ghp_1a2B3c4D5e6F7g8H9i0J1k2L3m4N5o6P7q8R", "MIIEowIBAAKCAQEA7bq3xKq1"]


def _stream(guard, text: str, cuts: list[int]) -> list[str]:
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    return [guard.feed(p) for p in pieces] + [guard.finish()]


def _leaks(released: str, raw: list[str] = RAW) -> list[str]:
    """Any run of 6+ characters of a secret that reached the client."""
    return [s[i:i + 6] for s in raw for i in range(len(s) - 5) if s[i:i + 6] in released]


@pytest.mark.parametrize("seed", range(6))
def test_stream_guard_redacts_secrets_split_across_chunks(seed):
    rails = _rails(output={"pii": "redact", "secrets": "redact"})
    whole, _ = rails.check_output(SECRETS_TEXT, "w")
    assert _leaks(whole) == [] and whole.count("<SECRET>") == 2 and "<PRIVATE_KEY>" in whole and "<EMAIL>" in whole
    rng = random.Random(seed)
    # Every way of splitting each secret in two, plus random chunkings and one char at a time.
    cut_sets = [sorted(rng.sample(range(1, len(SECRETS_TEXT)), rng.randint(5, 60))) for _ in range(20)]
    if seed == 0:
        cut_sets.append(list(range(1, len(SECRETS_TEXT))))
        for s in RAW:
            at = SECRETS_TEXT.index(s)
            cut_sets += [[at + k] for k in range(1, len(s))]
    for cuts in cut_sets:
        out = _stream(rails.guard("s"), SECRETS_TEXT, cuts)
        assert "".join(out) == whole  # the same text as a non-streamed answer
        # Nothing of a secret in any chunk, nor in what the client has seen at any point.
        seen = ""
        for chunk in out:
            seen += chunk
            assert _leaks(seen) == [], (cuts, seen)


def test_stream_guard_block_stops_before_the_secret():
    rails = _rails(output={"secrets": "block"}, refusal=" [content filtered]")
    for cuts in ([30, 60, 75, 90], list(range(1, len(SECRETS_TEXT)))):
        g = rails.guard("b")
        out = "".join(_stream(g, SECRETS_TEXT, cuts))
        assert g.blocked and out.endswith(" [content filtered]")
        assert _leaks(out, RAW[1:]) == [] and out.startswith("Here you go. The deploy user is ops@example.com")
    g = rails.guard("late")
    # Text after a block is never released, and finish() adds nothing.
    assert g.feed(SECRETS_TEXT) + g.feed("more text " * 20) + g.finish() == SECRETS_TEXT[: SECRETS_TEXT.index("AKIA")] + " [content filtered]"


def test_stream_guard_deny_phrase_split_and_not_cut_by_look_alike():
    rails = _rails(deny={"phrases": ["launch codes"], "words": ["zorp"]}, output={"deny": "redact"})
    text = "first we fetch the launch\n   codes, then zorped stuff and one zorp. " + "filler words " * 10
    whole, _ = rails.check_output(text, "x")
    assert whole.startswith("first we fetch the <PHRASE>, then zorped stuff and one <WORD>.")
    for n in (1, 3, 7):
        assert "".join(_stream(rails.guard("y"), text, list(range(n, len(text), n)))) == whole


def test_stream_guard_without_rails_passes_text_through_at_once():
    rails = _rails(enabled=False)
    g = rails.guard("p")
    assert g.feed("AKIAIOSF") == "AKIAIOSF" and g.feed("ODNN7EXAMPLE") == "ODNN7EXAMPLE" and g.finish() == ""


def test_generate_terminal_stream_shows_only_what_the_guard_releases(capsys, tmp_path):
    from conftest import train_tiny_tokenizer
    from llmctl.stages.generate import _guarded_streamer

    tok = train_tiny_tokenizer(["the quick brown fox"] * 4, tmp_path / "tok")
    rails = _rails(output={"secrets": "redact"})
    guard = rails.guard("prompt-0", choice=0)
    streamer = _guarded_streamer(tok, guard)
    for piece in ["Your key: AKIAIOSF", "ODNN7EX", "AMPLE, keep it safe. " + "z" * 120]:
        streamer.on_finalized_text(piece)
        assert "AKIA" not in capsys.readouterr().out
    streamer.on_finalized_text(" end", stream_end=True)
    out = capsys.readouterr().out
    assert guard.released.startswith("Your key: <SECRET>, keep it safe.") and guard.released.endswith(" end")
    assert "AKIA" not in out and "IOSF" not in out and "ODNN" not in out


def test_audit_log_file(tmp_path):
    from llmctl.safety import AuditLog, Rails

    log = AuditLog(tmp_path / "serve" / "audit.jsonl")
    rails = Rails(_cfg(output={"secrets": "redact"}), stage="serve", audit=log)
    rails.check_output("key AKIAIOSFODNN7EXAMPLE and mail bob@example.com", "cmpl-1", choice=0)
    lines = [json.loads(x) for x in (tmp_path / "serve" / "audit.jsonl").read_text().splitlines()]
    assert [(e["rail"], e["action"], e["kinds"], e["request_id"], e["choice"], e["stage"]) for e in lines] == [
        ("output.pii", "flag", {"email": 1}, "cmpl-1", 0, "serve"), ("output.secrets", "redact", {"secret": 1}, "cmpl-1", 0, "serve")
    ] or sorted(e["rail"] for e in lines) == ["output.pii", "output.secrets"]
    assert "AKIA" not in (tmp_path / "serve" / "audit.jsonl").read_text()
    rails = Rails(_cfg(audit=False), stage="serve", audit=AuditLog(tmp_path / "off.jsonl"))
    rails.check_output("bob@example.com", "x")
    assert not (tmp_path / "off.jsonl").exists()


# --------------------------------------------------------------------------- HTTP layer
class _FakeTok:
    chat_template = "plain"
    bos_token_id = None  # a tokenizer without BOS: prompts are the characters as sent

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 256 for c in text]}

    def decode(self, ids, **_):
        return "".join(chr(i) for i in ids)

    def apply_chat_template(self, msgs, tokenize=False, add_generation_prompt=True):
        return "\n".join(m["content"] for m in msgs)


class _ScriptedEngine:
    """The engine's interface, answering every sequence with the same scripted deltas."""

    def __init__(self, script: list[str]):
        self.script = script
        self.ready = threading.Event()
        self.ready.set()
        self.error = None
        self.tok = _FakeTok()
        self.context_length = 100_000
        self.max_queue = 64
        self.vocab_size = 256
        self.wants_bos = False
        self.prompts: list[str] = []

    def engine_metrics(self):
        return ""

    def submit(self, jobs):
        for j in jobs:
            self.prompts.append(self.tok.decode(j.prompt_ids))
            for piece in self.script:
                j.tokens.append(1)
                j.push(("delta", piece))
            j.push(("done", "stop", len(self.script)))


def _app(script, **safety):
    from llmctl.safety import AuditLog, Rails
    from llmctl.server.app import create_app
    from llmctl.server.metrics import Metrics

    metrics = Metrics()
    log = AuditLog(None)
    rails = Rails(_cfg(**safety), stage="serve", audit=log, on_event=metrics.safety)
    engine = _ScriptedEngine(script)
    return create_app(engine, "m", 512, None, metrics, rails=rails, max_request_bytes=4096), engine, log


def _client(app):
    openai = pytest.importorskip("openai")
    httpx = pytest.importorskip("httpx")
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")
    return openai.AsyncOpenAI(base_url="http://t/v1", api_key="x", http_client=http, max_retries=0), http


# The secret arrives split across chunks, inside the chunk boundaries of a real tokenizer.
SCRIPT = ["Sure. The key", " is AKIAIOSF", "ODNN7EX", "AMPLE and the", " mail is ops@exa", "mple.com; bye", " now. " + "x" * 80]


def test_http_streaming_redacts_and_blocks_secrets_split_across_chunks():
    app, engine, log = _app(SCRIPT, output={"secrets": "redact", "pii": "redact"})

    async def go():
        client, http = _client(app)
        full = await client.completions.create(model="m", prompt="hi", max_tokens=8)
        chunks = [c async for c in await client.completions.create(model="m", prompt="hi", max_tokens=8, stream=True)]
        chat = [c async for c in await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=True)]
        metrics = (await http.get("/metrics")).text
        return full, chunks, chat, metrics

    full, chunks, chat, metrics = asyncio.run(go())
    want = "Sure. The key is <SECRET> and the mail is <EMAIL>; bye now. " + "x" * 80
    assert full.choices[0].text == want and full.choices[0].finish_reason == "stop"
    texts = [c.choices[0].text for c in chunks]
    assert "".join(texts) == want and chunks[-1].choices[0].finish_reason == "stop"
    assert "".join(c.choices[0].delta.content or "" for c in chat) == want
    for t in texts:
        assert not re.search(r"AKIA|IOSF|ODNN|EXAMPLE|AMPLE|ops@|exa", t.replace("<SECRET>", "").replace("<EMAIL>", "")), t
    assert re.search(r'llmctl_safety_interventions_total\{rail="output.secrets",action="redact"\} 3', metrics)
    assert {e["request_id"] for e in log.events} == {full.id, chunks[0].id, chat[0].id}

    app, engine, log = _app(SCRIPT, output={"secrets": "block"}, refusal="[filtered]")

    async def blocked():
        client, _ = _client(app)
        full = await client.completions.create(model="m", prompt="hi", max_tokens=8)
        chunks = [c async for c in await client.completions.create(model="m", prompt="hi", max_tokens=8, stream=True)]
        chat = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        return full, chunks, chat

    full, chunks, chat = asyncio.run(blocked())
    assert full.choices[0].text == "Sure. The key is [filtered]" and full.choices[0].finish_reason == "content_filter"
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "content_filter"
    assert chat.choices[0].finish_reason == "content_filter" and chat.choices[0].message.refusal == "[filtered]"


@pytest.mark.parametrize("secret", [
    "AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYzq8Ls2Vd1",
    "[default]\naws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYzq8Ls2Vd1",
    "export DB_PASSWORD=hunter2secret",
    'export DB_PASSWORD="Tr0ub4dor&3"',
])
def test_http_chat_with_an_env_file_secret_is_refused_by_the_input_rail(secret):
    """Secrets written the way .env, ~/.aws/credentials and shell profiles hold them are
    refused under safety.input.secrets: block; placeholders and expansions pass."""
    httpx = pytest.importorskip("httpx")
    app, engine, log = _app(["ok"], input={"secrets": "block"})

    async def go(content):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
            return await http.post("/v1/chat/completions", json={"model": "m", "messages": [
                {"role": "system", "content": "You fix deploy scripts."},
                {"role": "user", "content": f"Why does this fail?\n{content}\nrun: ./deploy.sh"}]})

    r = asyncio.run(go(secret))
    body = r.json()["error"]
    assert r.status_code == 400 and body["code"] == "content_filter" and body["param"] == "messages[1].content"
    assert "'input.secrets'" in body["message"] and secret.split("=")[-1].strip('"') not in body["message"]
    assert engine.prompts == [] and [e["rail"] for e in log.events] == ["input.secrets"]
    ok = asyncio.run(go("export DB_PASSWORD=${DB_PASSWORD}\nPASSWORD=\nAPI_KEY=<your-api-key>\nthe password is required"))
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == "ok"


def test_http_blocked_input_is_a_400_naming_the_rail_and_redacted_input_reaches_the_model():
    openai = pytest.importorskip("openai")
    app, engine, log = _app(["ok"], input={"secrets": "block", "pii": "redact"}, deny={"words": ["zorp"]})

    async def go():
        client, http = _client(app)
        errs = []
        for call in (
            lambda: client.completions.create(model="m", prompt="my key AKIAIOSFODNN7EXAMPLE", max_tokens=2),
            lambda: client.chat.completions.create(model="m", messages=[{"role": "user", "content": "say zorp"}]),
            lambda: client.completions.create(model="m", prompt=[ord(c) for c in "AKIAIOSFODNN7EXAMPLE"], max_tokens=2),
        ):
            with pytest.raises(openai.BadRequestError) as e:
                await call()
            errs.append(e.value)
        ok = await client.completions.create(model="m", prompt="mail bob@example.com", max_tokens=2)
        big = await http.post("/v1/completions", json={"model": "m", "prompt": "x" * 5000})

        async def chunked():  # no Content-Length: the body is counted as it arrives
            yield b'{"model": "m", "prompt": "'
            for _ in range(10):
                yield b"y" * 500
            yield b'"}'

        big_chunked = await http.post("/v1/completions", content=chunked(), headers={"content-type": "application/json"})
        return errs, ok, (big, big_chunked)

    errs, ok, big = asyncio.run(go())
    body = errs[0].body
    assert errs[0].status_code == 400 and body["code"] == "content_filter" and body["param"] == "prompt"
    assert "'input.secrets'" in body["message"] and "AKIA" not in body["message"]
    assert errs[0].response.headers["x-request-id"].startswith("cmpl-")
    assert errs[1].body["param"] == "messages[0].content" and "'input.deny'" in errs[1].body["message"]
    assert errs[2].body["code"] == "content_filter"  # token-id prompts are decoded and checked too
    assert ok.choices[0].text == "ok" and engine.prompts == ["mail <EMAIL>"]
    for r in big:
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert "content-length" not in big[1].request.headers
    assert [e["rail"] for e in log.events if e["action"] == "block"] == ["input.secrets", "input.deny", "input.secrets"]


def test_moderations_endpoint_through_the_openai_client():
    # Rails that do nothing to traffic: moderation still runs every detector.
    app, _, _ = _app(["ok"], enabled=False, deny={"words": ["zorp"]})

    async def go():
        client, http = _client(app)
        one = await client.moderations.create(input="write to bob@example.com, key AKIAIOSFODNN7EXAMPLE")
        many = await client.moderations.create(input=["def add(a, b): return a + b", "zorp!"], model="omni-moderation-latest")
        parts = await http.post("/v1/moderations", json={"input": [{"type": "text", "text": "call +1 415 555 0132"}]})
        image = await http.post("/v1/moderations", json={"input": [{"type": "image_url", "image_url": {"url": "x"}}]})
        return one, many, parts.json(), image

    one, many, parts, image = asyncio.run(go())
    assert one.id.startswith("modr-") and one.model == "llmctl-rails" and len(one.results) == 1
    r = one.results[0]
    cats, scores = r.categories.model_dump(), r.category_scores.model_dump()
    assert r.flagged and cats["pii"] and cats["pii/email"] and cats["secrets"] and cats["secrets/secret"] and not cats["pii/phone"]
    assert scores["pii/email"] == 1.0 and scores["pii/phone"] == 0.0 and set(cats) == set(scores)
    assert r.category_applied_input_types.model_dump()["pii"] == ["text"]
    clean, deny = many.results
    assert not clean.flagged and deny.flagged and deny.categories.model_dump()["deny"]
    if "profanity" in cats:
        assert 0 <= scores["profanity"] <= 1
    assert parts["results"][0]["categories"]["pii/phone"] is True
    assert image.status_code == 400 and image.json()["error"]["param"] == "input"


# --------------------------------------------------------------------------- stages
def test_generate_applies_rails_and_writes_audit(trained_run):
    path, cfg, rd = trained_run
    # A random model samples byte soup; runs of lowercase letters are what the deny rail redacts.
    r = invoke_cli("generate", str(path), "--json", "--prompt", "the quick", "--prompt", "my key AKIAIOSFODNN7EXAMPLE",
                "--set", "safety.input.secrets=block", "--set", "safety.deny.regex=['[a-z]{2,}']", "--set", "safety.output.deny=redact",
                "--set", "safety.input.deny=off", "--set", "generate.max_new_tokens=32", "--set", "generate.top_k=0", "--set", "generate.top_p=1.0")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)["results"]
    assert [x["finish_reason"] == "content_filter" for x in res] == [False, True]
    assert res[1]["output"] == "" and res[1]["safety"] == [{"rail": "input.secrets", "action": "block", "kinds": {"secret": 1}}]
    out = res[0]["output"]
    assert "<REGEX>" in out and not re.search("[a-z]{2,}", out)
    assert {"rail": "output.deny", "action": "redact", "kinds": {"regex": out.count("<REGEX>")}} in res[0]["safety"]
    audit = rd.audit_path("generate").read_text()
    assert "input.secrets" in audit and "output.deny" in audit and "AKIA" not in audit


def test_redteam_eval_reports_rates_with_rails_off_and_on(trained_run):
    from llmctl.safety import load_redteam

    path, cfg, rd = trained_run
    items = load_redteam()
    assert len(items) >= 30 and len({i["id"] for i in items}) == len(items)
    assert {i["category"] for i in items} >= {"secrets", "pii", "abuse", "jailbreak"}
    r = invoke_cli("eval", str(path), "--json", "--set", "eval.safety=true", "--set", "eval.perplexity=false", "--set", "eval.generation=false",
                "--set", "eval.max_new_tokens=16", "--set", "eval.do_sample=true", "--set", "safety.deny.regex=['[a-z]{2,}']",
                "--set", "safety.output.deny=block", "--set", "safety.refusal=REFUSED",
                "--set", "safety.input.deny=off", "--set", "safety.input.secrets=block")
    assert r.returncode == 0, r.stderr
    res = json.loads(rd.results_path.read_text())["safety"]
    n = len(items)
    assert res["prompts"] == n and res["off"]["flagged_rate"] > 0.5 and res["on"]["flagged_rate"] < res["off"]["flagged_rate"]
    with_secrets = sum(1 for it in items if _rails().scan(it["prompt"], ["secrets"]))
    assert with_secrets >= 2 and res["on"]["blocked_inputs"] == with_secrets and res["on"]["blocked_outputs"] > 0
    assert res["off"]["refused"] == 0 and res["on"]["refused"] >= with_secrets  # the rails' refusal text counts as a refusal
    rows = [json.loads(x) for x in rd.redteam_file().read_text().splitlines()]
    assert len(rows) == n and all({"output_off", "flagged_off", "output_on", "flagged_on"} <= set(row) for row in rows)
    head = json.loads(r.stdout)
    assert head["safety_flagged_rate_off"] == res["off"]["flagged_rate"] and head["safety_flagged_rate_on"] == res["on"]["flagged_rate"]


def test_package_ships_the_redteam_set():
    text = (REPO / "pyproject.toml").read_text()
    assert '"llmctl.data" = ["*.jsonl"]' in text and (REPO / "llmctl" / "data" / "redteam.jsonl").is_file()


# --------------------------------------------------------------------------- safe defaults
def test_safe_defaults_in_the_schema():
    from llmctl.config import Config

    c = Config()
    assert c.serve.host == "127.0.0.1" and c.serve.api_key is None and c.serve.max_request_bytes <= 1_000_000
    assert c.model.trust_remote_code is False and c.tokenizer.trust_remote_code is False
    assert c.safety.enabled and c.safety.input.pii == c.safety.output.secrets == "flag" and c.safety.output.classifier == "off"


def test_pickled_weights_are_refused_and_remote_code_never_runs(tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import train_tiny_tokenizer
    from llmctl.errors import StageInputError
    from llmctl.modeling import load_for_inference

    mc = LlamaConfig(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=32)
    m = LlamaForCausalLM(mc)
    pickled = tmp_path / "bin"
    m.save_pretrained(pickled)
    train_tiny_tokenizer(["the quick brown fox"] * 4, pickled)
    (pickled / "model.safetensors").unlink()
    torch.save(m.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(StageInputError, match="safetensors weights only"):
        load_for_inference(str(pickled))
    remote = tmp_path / "remote"
    m.save_pretrained(remote)
    train_tiny_tokenizer(["the quick brown fox"] * 4, remote)
    cfg = json.loads((remote / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.Cfg", "AutoModelForCausalLM": "evil.Model"}
    (remote / "config.json").write_text(json.dumps(cfg))
    marker = tmp_path / "PWNED"
    (remote / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\nfrom transformers import LlamaConfig as Cfg, LlamaForCausalLM as Model\n")
    load_for_inference(str(remote))
    assert not marker.exists()


@pytest.mark.timeout(300)  # refusals run in this process: one that serves instead must not hang the suite
def test_serve_refuses_a_public_address_without_an_api_key(trained_run, tmp_path):
    import yaml

    path, cfg, rd = trained_run
    r = invoke_cli("serve", str(path), "--host", "0.0.0.0", "--port", "0", env={"LLMCTL_API_KEY": ""})
    assert r.returncode == 2 and "--insecure" in r.stderr and "serve.api_key" in r.stderr and "Traceback" not in r.stderr
    bad = write_config(tmp_path / "bad.yaml", {**yaml.safe_load(path.read_text()), "safety": {"deny": {"file": "missing.txt"}}})
    r = invoke_cli("serve", str(bad), "--port", "0")
    assert r.returncode == 2 and "safety.deny.file: 'missing.txt' not found" in r.stderr


def test_real_server_rails_moderation_audit_and_metrics(trained_run, tmp_path):
    """`llmctl serve` in a subprocess, through the official (sync) openai client."""
    import signal
    import subprocess
    import sys

    import yaml

    openai = pytest.importorskip("openai")
    httpx = pytest.importorskip("httpx")
    from test_serve import Server

    path, cfg, rd = trained_run
    d = yaml.safe_load(path.read_text())
    d["serve"] = {"model_name": "tiny", "max_request_bytes": 2048}
    d["safety"] = {"input": {"secrets": "block", "deny": "off"}, "output": {"deny": "redact"}, "deny": {"regex": ["[a-z]{2,}"]}}
    s = Server(write_config(tmp_path / "serve.yaml", d))
    try:
        c = s.client()
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model="tiny", prompt="key AKIAIOSFODNN7EXAMPLE", max_tokens=4)
        assert e.value.body["code"] == "content_filter" and "input.secrets" in e.value.body["message"]
        r = c.completions.create(model="tiny", prompt="the quick", max_tokens=24, temperature=1.0, seed=3)
        assert not re.search("[a-z]{2,}", r.choices[0].text)
        m = c.moderations.create(input=["call +1 415 555 0132", "X = 1 + 2  # 3"])
        assert [x.flagged for x in m.results] == [True, False] and m.results[0].categories.model_dump()["pii/phone"]
        big = httpx.post(s.url + "/v1/completions", json={"model": "tiny", "prompt": "x" * 3000})
        assert big.status_code == 413
        metrics = httpx.get(s.url + "/metrics").text
        assert 'llmctl_safety_interventions_total{rail="input.secrets",action="block"} 1' in metrics
        assert 'llmctl_requests_total{path="/v1/moderations",status="200"} 1' in metrics
    finally:
        assert s.stop() == 0, "".join(s.lines)
    events = [json.loads(x) for x in rd.audit_path("serve").read_text().splitlines()]
    assert events[0]["rail"] == "input.secrets" and events[0]["action"] == "block" and events[0]["request_id"] == e.value.response.headers["x-request-id"]
    assert "AKIA" not in rd.audit_path("serve").read_text()
    # --insecure on a public address: served, with a loud warning.
    proc = subprocess.Popen([sys.executable, "-m", "llmctl", "serve", str(path), "--host", "0.0.0.0", "--port", "0", "--insecure"],
                            cwd=REPO, stderr=subprocess.PIPE, text=True, env={**__import__("os").environ, "LLMCTL_API_KEY": ""})
    try:
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if "WITHOUT an API key" in line or "llmctl serve:" in line:
                break
        assert any("WARNING: serving 0.0.0.0 WITHOUT an API key (--insecure)" in x for x in lines), lines
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
