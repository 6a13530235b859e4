"""The run directory: the only contract between stages.

Only this module knows file names and layout. Each stage folder holds `manifest.json`
(status, times, config hash, lineage, versions, headline numbers) and `config.yaml` (the
resolved config that produced it). Outputs appear atomically, one writer holds a lock.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from filelock import FileLock, Timeout

from llmctl.errors import Interrupted, LockedError, StageInputError
from llmctl.hints import command, set_flags

if TYPE_CHECKING:
    from llmctl.config import Config

STAGE_ORDER = ("prepare", "train", "eval", "generate", "export")
MANIFEST = "manifest.json"
CONFIG_COPY = "config.yaml"
LOCK = ".lock"
TMP_MARK = ".tmp-"


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- atomic files
def _tmp_name(path: Path) -> Path:
    return path.parent / f".{path.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:6]}"


def atomic_write_text(path: Path | str, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path | str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def replace_path(src: Path, dst: Path) -> None:
    """Move a finished file or folder into place, replacing what was there."""
    if dst.exists() or dst.is_symlink():
        old = dst.parent / f".{dst.name}.old-{os.getpid()}"
        os.replace(dst, old)
        os.replace(src, dst)
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    else:
        os.replace(src, dst)


@contextmanager
def atomic_dir(path: Path | str) -> Iterator[Path]:
    """Yield a temporary folder; it becomes `path` only if the block completes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_path(tmp, path)


def clean_tmp(folder: Path) -> None:
    """Remove temporaries left by a killed process (call while holding the lock)."""
    if not folder.is_dir():
        return
    for p in folder.rglob(f"*{TMP_MARK}*"):
        if p.name.startswith("."):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    for p in folder.glob(".*.old-*"):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


@contextmanager
def _stage_lock(folder: Path) -> Iterator[None]:
    """Hold the stage folder's lock, or LockedError at once if another process holds it.

    An OS lock (flock on Unix, LockFileEx on Windows, through `filelock`): it dies with its
    process, so a killed writer never leaves a lock behind that looks held.
    """
    lock = FileLock(folder / LOCK, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise LockedError(f"{folder} is locked: another llmctl process is writing it (wait for it or stop it)") from None
    try:
        yield
    finally:
        lock.release()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


MODEL_FILES = ("config.json", "*.safetensors", "*.bin", "*.pt")


def _model_files(model_dir: Path) -> list[Path]:
    return sorted({f for pat in MODEL_FILES for f in Path(model_dir).glob(pat) if f.is_file()})


def model_hash(model_dir: Path | str) -> str:
    """sha256 over a model directory's config and weight files (names and contents)."""
    import hashlib

    h = hashlib.sha256()
    for f in _model_files(Path(model_dir)):
        h.update(f.name.encode() + b"\0" + sha256_file(f).encode() + b"\n")
    return h.hexdigest()


def model_stat(model_dir: Path | str) -> list:
    """Names, sizes and mtimes of the same files: a cheap first check before re-hashing."""
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in _model_files(Path(model_dir))]


def teacher_changed(rec: dict, role: str = "teacher") -> str | None:
    """Why the teacher recorded in a distilled student's manifest (or, with `role`, another model
    the run was measured against: a preference run's starting model) is no longer that model; None if it is."""
    where = rec.get("run_dir") or rec.get("path") or rec.get("source")
    if rec.get("run_dir"):
        tm = RunDir(rec["run_dir"]).manifest("train")
        if tm is None:
            return f"its {role} {rec['run_dir']}/train is gone"
        if tm.get("status") != "complete":
            return f"its {role} {rec['run_dir']}/train is {tm.get('status')}"
        if tm.get("id") != rec.get("run_id"):
            return f"its {role} {rec['run_dir']}/train was re-run since"
    if rec.get("kind") in ("run", "dir") and rec.get("path"):
        p = Path(rec["path"])
        if not (p / "config.json").is_file():
            return f"its {role} {where} is gone"
        if model_stat(p) != rec.get("stat") and model_hash(p) != rec.get("model_hash"):
            return f"its {role}'s weights in {p} changed"
    return None


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in ("llmctl", "torch", "transformers", "tokenizers", "datasets", "accelerate", "peft"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


# --------------------------------------------------------------------------- run dir
class RunDir:
    def __init__(self, root: Path | str):
        self.root = Path(root)

    @classmethod
    def for_config(cls, cfg: "Config", override: str | Path | None = None) -> "RunDir":
        return cls(override or cfg.run.root)

    # ---- layout -----------------------------------------------------------------
    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    def manifest_path(self, stage: str) -> Path:
        return self.stage_dir(stage) / MANIFEST

    # prepare
    @property
    def dataset_dir(self) -> Path:
        return self.root / "prepare" / "dataset"

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / "prepare" / "tokenizer"

    @property
    def pairs_dir(self) -> Path:
        """Held-out prompt/reference pairs (datasets save_to_disk) for BLEU, when the data has them."""
        return self.root / "prepare" / "pairs"

    @property
    def stats_path(self) -> Path:
        return self.root / "prepare" / "stats.json"

    @property
    def report_path(self) -> Path:
        """The data report of curation (what was removed, PII, languages, term groups)."""
        return self.root / "prepare" / "report.json"

    # train
    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "train" / "checkpoints"

    def checkpoint_dir(self, step: int) -> Path:
        return self.checkpoints_dir / f"step-{step:06d}"

    @property
    def model_dir(self) -> Path:
        return self.root / "train" / "model"

    @property
    def adapter_dir(self) -> Path:
        return self.root / "train" / "adapter"

    @property
    def metrics_path(self) -> Path:
        return self.root / "train" / "metrics.jsonl"

    @property
    def train_log_path(self) -> Path:
        return self.root / "train" / "train.log"

    # eval / generate / export
    @property
    def results_path(self) -> Path:
        return self.root / "eval" / "results.json"

    @property
    def predictions_path(self) -> Path:
        return self.root / "eval" / "predictions.jsonl"

    def results_file(self, stage: str = "eval") -> Path:
        return self.stage_dir(stage) / "results.json"

    def token_losses_file(self, stage: str = "eval") -> Path:
        return self.stage_dir(stage) / "token_losses.jsonl"

    def predictions_file(self, stage: str = "eval") -> Path:
        return self.stage_dir(stage) / "predictions.jsonl"

    def other_eval_stage(self, model: str) -> str:
        """The folder for an evaluation of a model that is not the run's: eval-<name>-<hash>."""
        import hashlib
        import re

        p = Path(model)
        key = str(p.resolve()) if p.exists() else model
        name = re.sub(r"[^A-Za-z0-9._]+", "_", p.name or model).strip("._")[:40] or "model"
        return f"eval-{name}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"

    @property
    def outputs_path(self) -> Path:
        return self.root / "generate" / "outputs.jsonl"

    @property
    def explain_json_path(self) -> Path:
        return self.stage_dir("explain") / "explain.json"

    @property
    def explain_html_path(self) -> Path:
        return self.stage_dir("explain") / "explain.html"

    @property
    def report_html_path(self) -> Path:
        """`llmctl report`: one self-contained page about the whole run."""
        return self.root / "report.html"

    def audit_path(self, stage: str) -> Path:
        """Safety interventions of a stage (generate, eval, serve), one JSON line each."""
        return self.root / stage / "audit.jsonl"

    def redteam_file(self, stage: str = "eval") -> Path:
        """Per-prompt results of the red-team eval (eval.safety)."""
        return self.stage_dir(stage) / "redteam.jsonl"

    def code_samples_file(self, stage: str = "eval") -> Path:
        """Every sampled completion of the code eval (eval.code) with its sandbox outcome."""
        return self.stage_dir(stage) / "code_samples.jsonl"

    def bias_pairs_file(self, stage: str = "eval") -> Path:
        """Every pair of the bias probe (eval.bias) with both log-likelihoods."""
        return self.stage_dir(stage) / "bias_pairs.jsonl"

    def export_dir(self, fmt: str) -> Path:
        return self.root / "export" / fmt

    # detached stages (llmctl.detach)
    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    def log_path(self, stage: str) -> Path:
        """RUN/logs/<stage>.log: a detached stage's output, plain lines."""
        return self.logs_dir / f"{stage}.log"

    def detach_record_path(self, stage: str) -> Path:
        """RUN/logs/<stage>.json: a detached stage's pid, start time and, once it ended, exit code."""
        return self.logs_dir / f"{stage}.json"

    # ---- manifests --------------------------------------------------------------
    def manifest(self, stage: str) -> dict | None:
        p = self.manifest_path(stage)
        if not p.is_file():
            return None
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None

    def staleness(self, stage: str, cfg: "Config") -> str | None:
        """Why a complete stage no longer matches the config or its inputs; None if fresh."""
        found = self._stale(stage, cfg)
        return found[1] if found else None

    def _stale(self, stage: str, cfg: "Config") -> tuple[str, str] | None:
        """(the upstream-most stage to re-run, why) or None."""
        m = self.manifest(stage)
        if m is None:
            return stage, "missing"
        for inp, rec in (m.get("lineage") or {}).items():
            cur = self.manifest(inp)
            if cur is None:
                return inp, f"its input {inp}/ is gone"
            if cur.get("status") != "complete":
                return inp, f"its input {inp}/ is {cur.get('status')}"
            deeper = self._stale(inp, cfg)
            if deeper:
                return deeper[0], f"its input {inp}/ is stale: {deeper[1]}"
            if cur.get("id") != rec.get("id"):
                return stage, f"{inp}/ was re-run since it ran"
        changes = self.config_changes(stage, cfg)
        if changes:
            from llmctl.config import show_value

            what = "; ".join(f"{k}: {show_value(a)} -> {show_value(b)}" if not k.startswith("(") else f"config sections {k[1:-1]}" for k, a, b in changes)
            return stage, f"config changed since it ran: {what}"
        if m.get("teacher"):
            why = teacher_changed(m["teacher"])
            if why:
                return stage, why
        start = (m.get("preference") or {}).get("reference_identity")
        if start:  # a preference run's starting model is its reference: another one trains another model
            why = teacher_changed(start, "starting (reference) model")
            if why:
                return stage, why
        return None

    def config_changes(self, stage: str, cfg: "Config") -> list[tuple[str, Any, Any]]:
        """(key, recorded, current) for each output-affecting key changed since `stage` ran.

        Keys that never change a stage's output (logging, cadence, budgets, workers) are not
        compared. Manifests written before per-key records fall back to the stage's config.yaml.
        """
        from llmctl.config import STAGE_SECTIONS, stage_kind, stage_values, value_changes

        m = self.manifest(stage)
        if m is None or not STAGE_SECTIONS.get(stage_kind(stage)):
            return []
        now = stage_values(cfg, stage)
        recorded = m.get("config_values")
        if recorded is None:
            if m.get("config_hash") == cfg.section_hash(*STAGE_SECTIONS[stage_kind(stage)]):
                return []
            recorded = self._values_from_copy(stage)
            if recorded is None:
                # No per-key record and no readable copy: only the whole sections can be compared.
                return [("(" + ", ".join(STAGE_SECTIONS[stage_kind(stage)]) + ")", None, None)]
        elif set(now) - set(recorded):
            # A key that became a result key since the stage ran (train.max_time on a fitted
            # schedule): what it was is in the stage's config copy.
            copy = self._values_from_copy(stage) or {}
            recorded = {**{k: copy[k] for k in set(now) - set(recorded) if k in copy}, **recorded}
        return value_changes(recorded, now)

    def _values_from_copy(self, stage: str) -> dict | None:
        from llmctl.config import load_config, stage_values
        from llmctl.errors import ConfigError

        copy = self.stage_dir(stage) / CONFIG_COPY
        try:
            return stage_values(load_config(copy), stage)
        except (ConfigError, OSError):
            return None

    def require(self, stage: str, cfg: "Config") -> dict:
        """The manifest of a complete, up-to-date input stage, or StageInputError (exit 3).

        The message ends with the command that fixes it, with the user's --set flags and
        --run-dir; it carries --force only to redo a stage that is complete but stale.
        """
        m = self.manifest(stage)
        verb = "distill" if stage == "train" and getattr(cfg, "distill", None) is not None else stage
        where = self.stage_dir(stage)
        if m is None:
            fix = command(verb, cfg, self.root)
            raise StageInputError(f"{where} is missing: run '{fix}' first", hint=fix)
        if m.get("status") == "running" and self.is_locked(stage):
            raise StageInputError(f"{where} is still being written by another llmctl process (pid {m.get('pid')}): wait for it to finish")
        if m.get("status") != "complete":
            fix = command(verb, cfg, self.root)  # no --force: it finishes (train resumes) what is there
            raise StageInputError(f"{where} is {m.get('status', 'incomplete')}: run '{fix}' to finish it", hint=fix)
        found = self._stale(stage, cfg)
        if found:
            culprit, why = found
            if culprit == "train" and getattr(cfg, "distill", None) is not None:
                culprit = "distill"
            fix = command(culprit, cfg, self.root, *(["--force"] if found[0] == stage else []))
            raise StageInputError(f"{where} is stale ({why}): run '{fix}' first{self.keep_hint(stage, cfg)}", hint=fix)
        return m

    def keep_hint(self, stage: str, cfg: "Config") -> str:
        """', or keep it with --set k=v ...': the overrides that describe what `stage` was run with."""
        changes = self.config_changes(stage, cfg)
        pairs = [(k, a) for k, a, _ in changes if not k.startswith("(") and a != "(not set)"]
        if not pairs or len(pairs) != len(changes):
            return ""
        return f", or keep it by passing the settings it was run with ({set_flags(pairs)})"

    def up_to_date(self, stage: str, cfg: "Config", extra_hash: str | None = None) -> bool:
        m = self.manifest(stage)
        if not m or m.get("status") != "complete":
            return False
        if extra_hash is not None and m.get("extra_hash") != extra_hash:
            return False
        return self.staleness(stage, cfg) is None

    # ---- writing a stage ------------------------------------------------------
    @contextmanager
    def begin(
        self,
        stage: str,
        cfg: "Config",
        inputs: list[str] | tuple[str, ...] = (),
        extra_hash: str | None = None,
    ) -> Iterator["StageRun"]:
        """Lock the stage, mark it running, and record how it ended.

        Normal exit: complete. `Interrupted`/KeyboardInterrupt: interrupted. Anything else:
        failed (the exception propagates).
        """
        from llmctl.config import STAGE_SECTIONS, config_to_yaml, stage_kind, stage_values, values_hash

        d = self.stage_dir(stage)
        d.mkdir(parents=True, exist_ok=True)
        with _stage_lock(d):
            clean_tmp(d)
            lineage = {}
            for inp in inputs:
                im = self.manifest(inp) or {}
                lineage[inp] = {k: im.get(k) for k in ("id", "stage", "config_hash", "finished_at", "headline")}
            sections = STAGE_SECTIONS.get(stage_kind(stage), ())
            values = stage_values(cfg, stage) if sections else {}
            manifest = {
                "stage": stage,
                "id": uuid.uuid4().hex,
                "status": "running",
                "started_at": now_iso(),
                "finished_at": None,
                "config_hash": values_hash(values) if sections else None,
                "config_sections": list(sections),
                "config_values": values,
                "pid": os.getpid(),
                "extra_hash": extra_hash,
                "config_file": cfg.source,
                "lineage": lineage,
                "versions": versions(),
                "host": platform.node(),
                "argv": sys.argv,
                "device": None,
                "headline": {},
            }
            st = StageRun(self, stage, manifest)
            atomic_write_text(d / CONFIG_COPY, config_to_yaml(cfg))
            st.save()
            t0 = time.time()
            try:
                yield st
            except (Interrupted, KeyboardInterrupt) as e:
                st.finish("interrupted", time.time() - t0, error=str(e) or "interrupted")
                raise
            except BaseException as e:
                st.finish("failed", time.time() - t0, error=f"{type(e).__name__}: {e}")
                raise
            st.finish("complete", time.time() - t0)

    def is_locked(self, stage: str) -> bool:
        """Whether a live process holds the stage's lock (a lock dies with its process)."""
        p = self.stage_dir(stage) / LOCK
        if not p.is_file():
            return False
        probe = FileLock(p, timeout=0)
        try:
            probe.acquire()
        except Timeout:
            return True
        probe.release()
        return False

    def status(self, cfg: "Config | None" = None, overrides: list[str] | tuple[str, ...] = ()) -> list[dict]:
        """One row per stage: state, times, headline numbers, and why it is not simply complete.

        A complete stage is stale when it no longer matches `cfg`; without one, when it no longer
        matches the config it recorded itself (its config.yaml, with `overrides`): a train run
        made with `--set train.x=...` is complete, not stale against prepare's copy. A train stage
        that is running or was interrupted shows its step of its total.
        """
        rows = []
        for stage in STAGE_ORDER:
            m = self.manifest(stage)
            if m is None:
                rows.append({"stage": stage, "status": "missing"})
                continue
            row = {
                "stage": stage,
                "status": m.get("status"),
                "started_at": m.get("started_at"),
                "finished_at": m.get("finished_at"),
                "seconds": m.get("seconds"),
                "headline": m.get("headline", {}),
            }
            prog = m.get("progress") or {}
            if prog.get("step") is not None:
                row["step"], row["total_steps"] = prog["step"], prog.get("total")
                if prog.get("checkpoint_step") is not None:
                    row["checkpoint_step"] = prog["checkpoint_step"]
            whys = []
            if m.get("status") == "running" and not self.is_locked(stage):
                # The process that marked it running is gone (SIGKILL, power loss): nobody holds the lock.
                row["status"] = "interrupted"
                whys.append("its process is gone; re-run the stage to resume or redo it")
            if row["status"] in ("running", "interrupted") and "step" in row:
                at = f"step {row['step']}/{row['total_steps'] or '?'}"
                if row["status"] == "running":
                    step, numbers = self._last_numbers(stage)
                    if step is not None and step > row["step"]:  # the manifest is written every 10 s, metrics every log step
                        row["step"] = step
                        at = f"step {step}/{row['total_steps'] or '?'}"
                    whys.insert(0, f"at {at}{numbers}" + _eta(prog, m) + f", pid {m.get('pid')}")
                else:
                    ckpt = row.get("checkpoint_step")
                    resumes = f", resumes from step {ckpt}" if ckpt is not None and ckpt != row["step"] else ""
                    whys.insert(0, f"interrupted at {at}{resumes}")
            if m.get("status") == "complete":
                own = cfg if cfg is not None else self._own_config(stage, overrides)
                why = self.staleness(stage, own) if own is not None else None
                if why:
                    row["status"] = "stale"
                    whys.append(why)
            if row["status"] == "running":
                row["pid"] = m.get("pid")
            if whys:
                row["why"] = "; ".join(whys)
            rows.append(row)
        return rows

    def _last_numbers(self, stage: str) -> tuple[int | None, str]:
        """(its step, ', loss L, N tok/s') from the last training record of a running train stage."""
        if stage != "train" or not self.metrics_path.is_file():
            return None, ""
        with open(self.metrics_path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            lines = f.read().decode("utf-8", "replace").splitlines()
        for line in reversed(lines):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # the first (cut) line of the tail, or a line being written
            if "loss" in rec:
                tps = f", {rec['tokens_per_s']:.0f} tok/s" if rec.get("tokens_per_s") is not None else ""
                return rec.get("step"), f", loss {rec['loss']:.4f}{tps}"
        return None, ""

    def _own_config(self, stage: str, overrides=()) -> "Config | None":
        """The config a stage recorded (its config.yaml) with `overrides`; None if it has none that
        this version reads. A bad override is the user's error (ConfigError)."""
        from llmctl.config import load_config
        from llmctl.errors import ConfigError

        copy = self.stage_dir(stage) / CONFIG_COPY
        try:
            load_config(copy)
        except (ConfigError, OSError):
            return None
        return load_config(copy, list(overrides))


def _eta(prog: dict, manifest: dict) -> str:
    """', eta H:MM:SS' from the steps done since the stage started, if that says anything."""
    step, total, t = prog.get("step"), prog.get("total"), prog.get("time")
    try:
        started = _dt.datetime.fromisoformat(manifest["started_at"]).timestamp()
    except (KeyError, TypeError, ValueError):
        return ""
    first = prog.get("first_step", 0)
    if not (step and total and t) or step <= first or t <= started:
        return ""
    from llmctl.console import fmt_duration

    return f", eta {fmt_duration((total - step) * (t - started) / (step - first))}"


class StageRun:
    """A stage being written: its folder, manifest and headline numbers."""

    def __init__(self, rundir: RunDir, stage: str, manifest: dict):
        self.rundir = rundir
        self.stage = stage
        self.manifest = manifest

    @property
    def dir(self) -> Path:
        return self.rundir.stage_dir(self.stage)

    @property
    def headline(self) -> dict:
        return self.manifest["headline"]

    def save(self) -> None:
        atomic_write_json(self.rundir.manifest_path(self.stage), self.manifest)

    def finish(self, status: str, seconds: float, error: str | None = None) -> None:
        self.manifest["status"] = status
        self.manifest["finished_at"] = now_iso()
        self.manifest["seconds"] = round(seconds, 3)
        if error:
            self.manifest["error"] = error
        self.save()
