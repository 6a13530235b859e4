"""Runs that outlive the SSH session: `--detach`, `llmctl logs`, `llmctl stop`.

`--detach` runs the same command line again, less `--detach`, in a new session: setsid leaves
it without a controlling terminal, so neither SIGHUP nor the shell's exit reaches it. Its output
goes to RUN/logs/<command>.log (plain lines: no TTY, NO_COLOR), and RUN/logs/<command>.json
records its pid, the process's start time (a reused pid is not mistaken for it) and, once it
ends, its exit code. The process writes that itself (`recording_exit`); `stop --now` writes it
for a process it kills. The stage's own manifest carries the same pid while it holds the lock.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, TextIO

from filelock import FileLock

from llmctl.errors import LlmctlError, LockedError
from llmctl.rundir import STAGE_ORDER, RunDir, atomic_write_json, now_iso

# The stage folders each detachable command writes: one of them busy refuses a second start.
WRITES = {"prepare": ("prepare",), "train": ("train",), "distill": ("train",), "eval": ("eval",), "run": STAGE_ORDER}
ENV = "LLMCTL_DETACHED"  # set in the detached process: the record it writes its exit code into
KILLED = 128 + signal.SIGKILL  # the exit code `stop --now` records, as a shell reports it


# --------------------------------------------------------------------------- records
def read_record(rd: RunDir, command: str) -> dict | None:
    p = rd.detach_record_path(command)
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _update(path: Path, **values) -> dict:
    """Merge `values` into a record under its own lock (the launcher and the process both write it)."""
    with FileLock(str(path) + ".lock"):
        try:
            rec = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            rec = {}
        rec.update(values)
        atomic_write_json(path, rec)
    return rec


def _started(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch); None if there is none, or a zombie."""
    import psutil

    try:
        p = psutil.Process(pid)
        return None if p.status() == psutil.STATUS_ZOMBIE else p.create_time()
    except psutil.Error:
        return None


def alive(rec: dict | None) -> bool:
    """The record's process still runs: same pid, same start time, no exit code written."""
    if not rec or rec.get("pid") is None or rec.get("exit_code") is not None:
        return False
    started = _started(rec["pid"])
    return started is not None and abs(started - rec.get("create_time", started)) < 1.0


def live(rd: RunDir) -> dict[str, dict]:
    """command -> record, for each detached command of this run that still runs."""
    out = {}
    for p in sorted(rd.logs_dir.glob("*.json")) if rd.logs_dir.is_dir() else ():
        rec = read_record(rd, p.stem)
        if alive(rec):
            out[p.stem] = rec
    return out


# --------------------------------------------------------------------------- --detach
def refuse_if_busy(rd: RunDir, command: str) -> None:
    """LockedError (exit 1) when a detached command or any writer holds a folder `command` writes."""
    folders = set(WRITES[command])
    for other, rec in live(rd).items():
        if folders & set(WRITES.get(other, (other,))):
            raise LockedError(
                f"{rd.root}: '{other}' is already running detached (pid {rec['pid']}, since {rec.get('started_at')}): "
                f"follow it with 'llmctl logs {shlex.quote(str(rd.root))} -f' or stop it with 'llmctl stop {shlex.quote(str(rd.root))}'"
            )
    for stage in sorted(folders):
        if rd.is_locked(stage):
            pid = (rd.manifest(stage) or {}).get("pid")
            raise LockedError(f"{rd.stage_dir(stage)} is locked: another llmctl process (pid {pid}) is writing it; "
                              f"stop it with 'llmctl stop {shlex.quote(str(rd.root))}' or wait for it")


def without_detach(argv: list[str]) -> list[str]:
    return [a for a in argv if a != "--detach"]


def spawn(rd: RunDir, command: str, argv: list[str]) -> dict:
    """Start `llmctl ARGV` (less --detach) in its own session, output to RUN/logs; its record."""
    refuse_if_busy(rd, command)
    argv = without_detach(argv)
    rd.logs_dir.mkdir(parents=True, exist_ok=True)
    log_path, rec_path = rd.log_path(command), rd.detach_record_path(command)
    rec = {"command": command, "pid": None, "started_at": now_iso(), "argv": argv, "cwd": os.getcwd(),
           "log": str(log_path), "exit_code": None, "finished_at": None}
    with FileLock(str(rec_path) + ".lock"):
        atomic_write_json(rec_path, rec)
    env = dict(os.environ, **{ENV: str(rec_path), "PYTHONUNBUFFERED": "1", "NO_COLOR": "1", "TERM": "dumb"})
    with open(log_path, "ab") as log:
        log.write(f"=== {now_iso()} llmctl {shlex.join(argv)}\n".encode())
        log.flush()
        proc = subprocess.Popen([sys.executable, "-m", "llmctl", *argv], stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True, close_fds=True)
    # The process may already have ended (a config error): its exit code is kept.
    rec = _update(rec_path, pid=proc.pid, create_time=_started(proc.pid) or time.time())
    root = shlex.quote(str(rd.root))
    return {"run_dir": str(rd.root), "command": command, "pid": proc.pid, "log": str(log_path),
            "follow": f"llmctl logs {root} -f", "status": f"llmctl status {root}", "stop": f"llmctl stop {root}"}


@contextmanager
def recording_exit(record: str | None) -> Iterator[None]:
    """In a detached process: write its exit code (and end time) into its record as it exits."""
    if not record:
        yield
        return
    code = 1
    try:
        yield
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        raise
    except KeyboardInterrupt:
        code = 128 + signal.SIGINT
        raise
    finally:
        _update(Path(record), exit_code=code, finished_at=now_iso())


# --------------------------------------------------------------------------- logs
def pick_log(rd: RunDir, command: str | None) -> Path:
    """RUN/logs/<command>.log, or the newest log; a clear error naming those that exist."""
    logs = sorted(rd.logs_dir.glob("*.log"), key=lambda p: p.stat().st_mtime) if rd.logs_dir.is_dir() else []
    if command is not None:
        p = rd.log_path(command)
        if p.is_file():
            return p
        have = ", ".join(q.stem for q in logs) or "none"
        raise LlmctlError(f"{p}: no such log (logs in {rd.logs_dir}: {have})")
    if not logs:
        raise LlmctlError(f"{rd.logs_dir}: no logs yet: start a stage with --detach (e.g. 'llmctl train CONFIG --detach')")
    return logs[-1]


def follow(path: Path, rec_of: Callable[[], dict | None], out: TextIO, keep_following: bool, poll: float = 0.3) -> dict | None:
    """Copy `path` to `out`; with `keep_following`, keep copying until the detached process ends."""
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        while True:
            chunk = f.read()
            if chunk:
                out.write(chunk)
                out.flush()
                continue
            rec = rec_of()
            if not keep_following or not alive(rec):
                rest = f.read()  # what it wrote while it ended
                if rest:
                    out.write(rest)
                    out.flush()
                return rec
            time.sleep(poll)


# --------------------------------------------------------------------------- stop
def _targets(rd: RunDir, command: str | None) -> list[tuple[str, int, dict | None]]:
    """(what, pid, record or None) to stop: detached commands, else any stage holding its lock."""
    found = [(c, rec["pid"], rec) for c, rec in live(rd).items() if command in (None, c)]
    if found:
        return found
    for stage in STAGE_ORDER:
        if command in (None, stage) and rd.is_locked(stage):
            pid = (rd.manifest(stage) or {}).get("pid")
            if pid and _started(pid) is not None:
                found.append((stage, pid, None))
    return found


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and everything it started (torchrun's ranks run in sessions of their own)."""
    import psutil

    try:
        procs = [psutil.Process(pid)]
        procs += procs[0].children(recursive=True)
    except psutil.Error:
        return
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass


def _wait_gone(pid: int, created: float, timeout: float, tick: Callable[[float], None]) -> bool:
    t0 = time.time()
    while time.time() - t0 < timeout:
        started = _started(pid)
        if started is None or abs(started - created) >= 1.0:
            return True
        tick(time.time() - t0)
        time.sleep(0.2)
    return False


def _wait_unlocked(rd: RunDir, what: str, pid: int, timeout: float) -> None:
    """Wait until no stage lock is held for an owner that is gone (the manifest's pid, else `pid`).

    A killed multithreaded process shows as a zombie as soon as its main thread ends, while its
    other threads, still exiting, hold its files (and so the lock) a moment longer: an outcome
    read before then would say "running"."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if not any(rd.is_locked(s) and _started((rd.manifest(s) or {}).get("pid") or pid) is None
                   for s in WRITES.get(what, (what,))):
            return  # every lock is free, or held by a process that still lives (not ours to wait for)
        time.sleep(0.1)


def stop(rd: RunDir, command: str | None, now: bool, timeout: float, say: Callable[[str], None]) -> dict:
    """SIGTERM (the stage saves a checkpoint, exits 143) or, `now`, SIGKILL; wait for it to end."""
    targets = _targets(rd, command)
    if not targets:
        raise LlmctlError(f"{rd.root}: nothing is running{f' for {command}' if command else ''} (see 'llmctl status {shlex.quote(str(rd.root))}')")
    out = {}
    for what, pid, rec in targets:
        created = _started(pid) or 0.0
        if now:
            _kill_tree(pid)
        else:
            os.kill(pid, signal.SIGTERM)
        say(f"{what}: sent {'SIGKILL' if now else 'SIGTERM'} to pid {pid}" + ("" if now else "; waiting for it to save a checkpoint"))
        last = [0.0]

        def tick(elapsed: float) -> None:
            if elapsed - last[0] >= 10:
                last[0] = elapsed
                say(f"{what}: still saving after {elapsed:.0f} s")

        t0 = time.time()
        if not _wait_gone(pid, created, timeout, tick):
            raise LlmctlError(f"{what} (pid {pid}) is still running {timeout:.0f} s after SIGTERM: wait longer "
                              f"(--timeout), or kill it with 'llmctl stop {shlex.quote(str(rd.root))} --now' (loses the steps since the last checkpoint)")
        _wait_unlocked(rd, what, pid, max(5.0, timeout - (time.time() - t0)))
        if rec is not None and now:
            rec = _update(rd.detach_record_path(what), exit_code=KILLED, finished_at=now_iso())
        elif rec is not None:
            rec = read_record(rd, what)
        out[what] = _outcome(rd, what, pid, rec)
    return out if len(out) > 1 else next(iter(out.values()))


def _outcome(rd: RunDir, what: str, pid: int, rec: dict | None) -> dict:
    """What `stop` reports: the exit code recorded, each stage's state, the checkpoint, the resume command."""
    res: dict = {"stopped": what, "pid": pid, "recorded_exit_code": (rec or {}).get("exit_code")}
    for stage in WRITES.get(what, (what,)):
        m = rd.manifest(stage) or {}
        status = m.get("status")
        if status == "running" and not rd.is_locked(stage):
            status = "interrupted"  # killed: nobody holds its lock
        if status in ("running", "interrupted"):
            res[f"{stage}_status"] = status
            prog = m.get("progress") or {}
            if prog.get("checkpoint_step") is not None:
                res["checkpoint_step"] = prog["checkpoint_step"]
    if rec is not None:
        argv = [a for a in rec.get("argv", []) if a not in ("--force", "--json")]  # a resume never starts over
        res["resume"] = shlex.join(["llmctl", *argv, "--detach"])
    return res


def annotate(rd: RunDir, rows: list[dict]) -> None:
    """`llmctl status`: a detached command that has not opened its stage yet (importing, loading
    the model) shows that stage as starting, with its pid and log."""
    by_stage = {r["stage"]: r for r in rows}
    for command, rec in live(rd).items():
        mine = [by_stage[s] for s in WRITES.get(command, ()) if s in by_stage]
        if any(r["status"] == "running" for r in mine):
            continue
        first = next((r for r in mine if r["status"] != "complete"), None)
        if first is not None:
            first.update(status="starting", pid=rec["pid"], why=f"detached {command}, pid {rec['pid']}, log {rec['log']}")
