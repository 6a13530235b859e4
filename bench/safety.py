"""Safety rails' detectors: false positives on benign code, recall, and the classifier.

Everything runs through the project's own code (`llmctl.safety.Rails` with the default
config, whose pii and secrets detectors are `llmctl.detectors`; `llmctl.safety.Classifier`):

- benign fixture: the non-empty lines of `tests/fixtures/benign_code.txt` after its header
  comment (code look-alikes of every kind), each scanned alone. Target (docs/safety.md): no
  line flagged.
- stdlib: every `.py` file of a fixed list of standard-library packages and modules, paths
  taken from the running interpreter, each file scanned whole (as the rails see a text);
  a line is flagged when a finding starts in it. Target: nothing but e-mail addresses (the
  stdlib's authors' addresses are real PII, rightly found).
- recall: the positive examples of `tests/fixtures/safety_positives.json` (the same ones
  tests/test_safety.py asserts on), per kind. Target: >= 95% for every kind (the test's bar).
- classifier (alt-profanity-check, when installed; skipped with the reason otherwise): per
  line of the stdlib files and of the benign fixture, the highest score of the line's
  sentences, counted at thresholds 0.5/0.8/0.9/0.95, the top-scoring lines, and its load time
  in fresh interpreters. Target: <= 2% of the benign fixture at the default threshold (the
  test's bar).

Rails' cost per request is measured by bench/serve.py on real streamed answers.

    .venv/bin/python bench/safety.py      # writes bench/results/safety.json (well under a minute)
"""

from __future__ import annotations

import bisect
import importlib.util
import platform
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from common import machine, ratio, write_result

HERE = Path(__file__).resolve().parent
FIXTURES = HERE.parent / "tests" / "fixtures"
STDLIB = ["json", "collections", "argparse", "subprocess", "threading", "asyncio", "logging", "pathlib",
          "shutil", "tempfile", "unittest", "concurrent"]
THRESHOLDS = (0.5, 0.8, 0.9, 0.95)
EXAMPLES = 10
LOAD_RUNS = 3


def benign_lines() -> list[str]:
    """The benign fixture's non-empty lines after its header comment (tests/test_safety.py reads it the same way)."""
    lines = (FIXTURES / "benign_code.txt").read_text(encoding="utf-8").splitlines()
    while lines and lines[0].startswith("# "):
        lines.pop(0)
    return [ln for ln in lines if ln.strip()]


def positives() -> dict[str, list[str]]:
    import json

    return json.loads((FIXTURES / "safety_positives.json").read_text(encoding="utf-8"))["positives"]


def stdlib_files() -> list[tuple[str, Path]]:
    """(name relative to the stdlib, path) of every .py file of STDLIB, from this interpreter."""
    out = []
    for mod in STDLIB:
        spec = importlib.util.find_spec(mod)
        if spec is None or spec.origin is None and not spec.submodule_search_locations:
            raise SystemExit(f"bench/safety.py: stdlib module {mod!r} not found in {sys.executable}")
        if spec.submodule_search_locations:
            root = Path(list(spec.submodule_search_locations)[0])
            files = sorted(root.rglob("*.py"))
            out += [(f"{mod}/{p.relative_to(root).as_posix()}", p) for p in files]
        else:
            out.append((Path(spec.origin).name, Path(spec.origin)))
    return out


def _line_starts(text: str) -> list[int]:
    starts = [0]
    i = text.find("\n")
    while i >= 0:
        starts.append(i + 1)
        i = text.find("\n", i + 1)
    return starts


def _redacted(line: str) -> str:
    """A flagged line as an example, its matches replaced by placeholders (no PII in results.json)."""
    from llmctl import detectors

    return detectors.redact(line.strip())[0][:100]


def detectors_on_benign(rails) -> dict:
    lines = benign_lines()
    by_kind: Counter = Counter()
    flagged = []
    for ln in lines:
        kinds = sorted({f.kind for f in rails.scan(ln, ["pii", "secrets"])})
        if kinds:
            by_kind.update(kinds)
            flagged.append({"kinds": kinds, "line": _redacted(ln)})
    return {"lines": len(lines), "flagged_lines": len(flagged), "by_kind": dict(by_kind), "examples": flagged[:EXAMPLES]}


def detectors_on_stdlib(rails, texts: list[tuple[str, str]]) -> dict:
    lines = nbytes = 0
    by_kind: Counter = Counter()
    flagged = []
    seconds = 0.0
    for name, text in texts:
        lines += sum(1 for ln in text.splitlines() if ln.strip())
        nbytes += len(text.encode("utf-8"))
        t0 = time.perf_counter()
        found = rails.scan(text, ["pii", "secrets"])
        seconds += time.perf_counter() - t0
        starts = _line_starts(text)
        per_line: dict[int, set] = {}
        for f in found:
            per_line.setdefault(bisect.bisect_right(starts, f.start) - 1, set()).add(f.kind)
        for i, kinds in sorted(per_line.items()):
            by_kind.update(kinds)
            line = text[starts[i]:starts[i + 1] if i + 1 < len(starts) else len(text)]
            flagged.append({"file": name, "line_no": i + 1, "kinds": sorted(kinds), "line": _redacted(line)})
    other = [f for f in flagged if set(f["kinds"]) - {"email"}]
    return {"files": len(texts), "lines": lines, "bytes": nbytes, "flagged_lines": len(flagged), "by_kind": dict(by_kind),
            "flagged_lines_other_than_email": len(other), "examples": (other + [f for f in flagged if f not in other])[:EXAMPLES],
            "scan_seconds": round(seconds, 3), "mb_per_s": round(nbytes / 1e6 / seconds, 2)}


def recall(rails) -> dict:
    out = {}
    for kind, texts in positives().items():
        missed = [t for t in texts if kind not in {f.kind for f in rails.scan(t, ["pii", "secrets"])}]
        out[kind] = {"found": len(texts) - len(missed), "of": len(texts), "recall": round(1 - len(missed) / len(texts), 4),
                     "missed": [_redacted(t) for t in missed]}
    return out


LOAD = r'''
import time
t0 = time.perf_counter()
from llmctl.safety import Classifier
Classifier(0.9).load()(["warm up"])
print(time.perf_counter() - t0)
'''


def _line_scores(clf, text: str) -> list[tuple[int, float]]:
    """(line index, highest score of the sentences that start on it) for each line with text."""
    starts = _line_starts(text)
    best: dict[int, float] = {}
    for a, b, p in clf.scores(text):
        seg = text[a:b]
        at = a + (len(seg) - len(seg.lstrip()))  # the segment's first character with text
        i = bisect.bisect_right(starts, at) - 1
        best[i] = max(best.get(i, 0.0), p)
    return sorted(best.items())


def _counts(scores: list[float]) -> dict:
    return {str(t): sum(1 for s in scores if s >= t) for t in THRESHOLDS}


def classifier(texts: list[tuple[str, str]], default_threshold: float) -> dict:
    from llmctl.safety import Classifier

    if not Classifier.available():
        return {"skipped": "alt-profanity-check is not installed (pip install 'llmctl[safety]')"}
    from importlib.metadata import version

    loads = []
    for _ in range(LOAD_RUNS):  # fresh interpreters: what serve or generate pays once
        r = subprocess.run([sys.executable, "-c", LOAD], capture_output=True, text=True, check=True)
        loads.append(round(float(r.stdout.strip().splitlines()[-1]), 2))
    clf = Classifier(default_threshold)
    clf.load()
    scored = []  # (score, file, line_no, line)
    t0 = time.perf_counter()
    for name, text in texts:
        lines = text.splitlines()
        scored += [(p, name, i + 1, lines[i].strip()) for i, p in _line_scores(clf, text)]
    seconds = time.perf_counter() - t0
    benign = benign_lines()
    benign_scores = [max(p for _, _, p in clf.scores(ln)) for ln in benign]
    top = sorted(scored, key=lambda s: -s[0])[:EXAMPLES]
    btop = sorted(zip(benign_scores, benign), key=lambda s: -s[0])[:3]
    return {
        "package": f"alt-profanity-check {version('alt-profanity-check')}",
        "default_threshold": default_threshold,
        "load_seconds": loads, "load_seconds_median": statistics.median(loads),
        "stdlib": {"lines": len(scored), "flagged_at": _counts([s[0] for s in scored]), "score_seconds": round(seconds, 2),
                   "top": [{"score": round(p, 4), "file": f, "line_no": n, "line": ln[:100]} for p, f, n, ln in top]},
        "benign": {"lines": len(benign), "flagged_at": _counts(benign_scores),
                   "top": [{"score": round(p, 4), "line": ln[:100]} for p, ln in btop]},
    }


def main() -> None:
    from llmctl.config import SafetyConfig
    from llmctl.safety import Rails

    at_start = machine()
    cfg = SafetyConfig()
    rails = Rails(cfg, stage="bench")  # the default rails: every detector as shipped
    rails.scan("+1 415 555 0132", ["pii"])  # load libphonenumber's metadata before timing
    texts = [(name, p.read_text(encoding="utf-8", errors="replace")) for name, p in stdlib_files()]
    benign = detectors_on_benign(rails)
    stdlib = detectors_on_stdlib(rails, texts)
    rec = recall(rails)
    clf = classifier(texts, cfg.classifier_threshold)
    metrics = {"machine": at_start, "python": platform.python_version(), "stdlib_modules": STDLIB,
               "benign_fixture": benign, "stdlib": stdlib, "recall": rec, "classifier": clf}
    ratios = {
        "safety detectors: benign fixture lines flagged": ratio(benign["flagged_lines"], 0, higher_is_better=False),
        "safety detectors: stdlib lines flagged other than e-mail": ratio(stdlib["flagged_lines_other_than_email"], 0, higher_is_better=False),
        "safety detectors: recall, lowest kind": ratio(min(r["recall"] for r in rec.values()), 0.95),
    }
    if "skipped" not in clf:
        t = str(cfg.classifier_threshold)
        ratios[f"safety classifier: benign fixture lines flagged at {t}, %"] = ratio(
            100 * clf["benign"]["flagged_at"][t] / clf["benign"]["lines"], 2.0, higher_is_better=False)
        ratios[f"safety classifier: stdlib lines flagged at {t}, %"] = ratio(100 * clf["stdlib"]["flagged_at"][t] / clf["stdlib"]["lines"], None)
    write_result("safety", metrics, ratios, model_params=None)  # detectors and the classifier on text: no language model


if __name__ == "__main__":
    main()
