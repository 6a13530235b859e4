"""`train.max_restarts`: a crashed run continues from its last checkpoint by itself.

One process: `supervise` runs the run's resume command (same config, --set flags, run directory)
as a child and starts it again after a crash. `--nproc N` on one node: the launcher
(llmctl.train.launch) runs torchrun again, all ranks on a fresh rendezvous, through the same
`restarts` loop. Either way the new try resumes exactly from the last checkpoint, as any re-run
does; each restart is logged with its cause and listed in the train manifest's `restarts`.

Not retried, because a restart would fail the same way or undo the user's decision: SIGINT and
SIGTERM; exits 2-4 (config, data, input stage); an error llmctl explained (a NaN loss, a lock);
a try that failed before it opened the train stage.

Several nodes are not restarted: each node's launcher can relaunch only its own ranks, and the
others' would wait for a rendezvous that never comes. Running the same command again on every
node resumes exactly.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable

from llmctl import console as _console
from llmctl import errors
from llmctl.errors import LlmctlError
from llmctl.rundir import RunDir, atomic_write_json, now_iso
from llmctl.train.checkpoints import STEP_RE, complete_checkpoints, interrupted

SUPERVISED = "LLMCTL_SUPERVISED"  # set in the supervised child: it trains, and leaves reporting to the supervisor
EXPLAINED = {c.__name__ for c in vars(errors).values() if isinstance(c, type) and issubclass(c, LlmctlError)}
STOPS = (signal.SIGINT, signal.SIGTERM)
NOT_RETRIED = (2, 3, 4)  # config, data, input stage (DESIGN.md's exit codes): the same run fails the same way


@dataclass(frozen=True)
class Failure:
    """One process of a failed try: its exit code (negative: killed by that signal) and who it was."""

    code: int
    rank: int | None = None  # under torchrun: the global rank; None: the one supervised process
    pid: int | None = None

    @property
    def who(self) -> str:
        return "the process" if self.rank is None else f"rank {self.rank} (pid {self.pid})"

    @property
    def stop(self) -> int | None:
        """SIGINT/SIGTERM if that ended it (killed by it, or exited 130/143 after saving)."""
        sig = -self.code if self.code < 0 else self.code - 128
        return sig if sig in STOPS else None

    def __str__(self) -> str:
        if self.code < 0:
            return f"{self.who} was killed by {_signal_name(-self.code)}"
        return f"{self.who} exited with code {self.code}"


def supervises(cfg, nproc: int, nnodes: int) -> bool:
    """Whether this process is the one-process supervisor (not a rank, not already supervised)."""
    return (cfg.train.max_restarts > 0 and nproc == 1 and nnodes == 1 and "LOCAL_RANK" not in os.environ
            and os.environ.get(SUPERVISED) != "1")


def supervise(cfg, rd: RunDir, resume_cmd: str, force: bool) -> dict:
    """One process: run the training as a child until it succeeds, stops for a reason a restart
    cannot fix, or has been restarted `train.max_restarts` times; the train manifest's headline."""
    con = _console.current()
    base = [sys.executable, "-m", "llmctl", *shlex.split(resume_cmd)[1:], *(["--quiet"] if con.quiet else [])]

    def attempt(first: bool) -> list[Failure]:
        code, sig = _run_child(base + (["--force"] if force and first else []))
        if code != 0 and sig is not None:  # the user's stop, forwarded: the child saved what it could
            raise interrupted(sig, rd, resume_cmd)
        return [] if code == 0 else [Failure(code)]

    restarts(rd, cfg.train.max_restarts, resume_cmd, attempt)
    return {**(rd.manifest("train") or {}).get("headline", {})}


def restarts(rd: RunDir, limit: int, resume_cmd: str, attempt: Callable[[bool], list[Failure]]) -> list[dict]:
    """Run `attempt(first)` (its failed processes; none: success) again after each crash a restart
    can fix, at most `limit` times; the restarts, also in the train manifest.

    Raises Interrupted (exit 130/143) when a stop signal ended the try, and an LlmctlError with
    the try's exit code (2-4) or 1 when it failed for good.
    """
    con = _console.current()
    done: list[dict] = []
    try:
        while True:
            before = _stage_id(rd)
            failures = attempt(not done)
            if not failures:
                return done
            crashed = [f for f in failures if not f.stop]
            if not crashed:  # every failed process was stopped by SIGINT/SIGTERM: someone meant it
                raise interrupted(failures[0].stop, rd, resume_cmd)
            # The others (exit 143) are the survivors torchrun stopped after the crash.
            cause = _crash_cause(crashed, rd, opened=_stage_id(rd) not in (None, before))
            if cause is None or len(done) >= limit:
                err = LlmctlError(f"train failed ({'; '.join(map(str, crashed))}) "
                                  + (f"after its restarts were used up ({len(done)}/{limit})" if cause else
                                     "with an error a restart would repeat: not retried") + "; see its message above")
                err.exit_code = exit_code(failures)
                raise err
            step = _last_step(rd)
            root = next((f for f in crashed if f.code < 0), crashed[0])  # a kill explains the others' failures
            done.append({"at": now_iso(), "cause": cause, "exit_code": root.code, "resumed_from_step": step})
            con.warn(f"train: restart {len(done)}/{limit} after {cause}; resuming from "
                     + (f"step {step}" if step is not None else "the start (no checkpoint yet)"))
    finally:
        _record(rd, done)


def exit_code(failures: list[Failure]) -> int:
    """The command's exit code for a failed try: 2-4 when a process said so (DESIGN.md), 130/143 when
    every failed process was stopped by SIGINT/SIGTERM, else 1."""
    crashed = [f for f in failures if not f.stop]
    if not crashed:
        return 128 + failures[0].stop
    return next((f.code for f in crashed if f.code in NOT_RETRIED), 1)


def _run_child(cmd: list[str]) -> tuple[int, int | None]:
    """(exit code, the stop signal this supervisor forwarded or None). SIGTERM/SIGINT reach the
    child once, through us: it runs in its own process group, so the terminal's Ctrl-C does not
    reach it directly."""
    got: list[int] = []
    proc = subprocess.Popen(cmd, env=dict(os.environ, **{SUPERVISED: "1"}), process_group=0)

    def forward(signum, frame):
        got.append(signum)
        try:
            proc.send_signal(signum)
        except ProcessLookupError:
            pass

    old = {s: signal.signal(s, forward) for s in STOPS}
    try:
        code = proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return code, (got[0] if got else None)


def _crash_cause(failures: list[Failure], rd: RunDir, opened: bool) -> str | None:
    """Why the try died, if a restart can help; None if it cannot.

    `opened`: the try opened the train stage (a new manifest id). The manifest's pid cannot tell:
    under torchrun it is rank 0's, and rank 0 may not be among the failed processes.
    """
    if any(f.code in NOT_RETRIED for f in failures):
        return None
    killed = [f for f in failures if f.code < 0]
    if killed:  # a signal from outside (the OOM killer): the next try may well get through
        return "; ".join(map(str, killed))
    if not opened:
        return None  # it failed before it opened the stage: it would again
    error = str((rd.manifest("train") or {}).get("error") or "")
    if error.split(":", 1)[0] in EXPLAINED:
        return None
    # The manifest's error is the one process's, or rank 0's.
    return "; ".join(f"{f} ({error[:200] or 'no error recorded'})" if f.rank in (None, 0) else str(f) for f in failures)


def _stage_id(rd: RunDir) -> str | None:
    return (rd.manifest("train") or {}).get("id")


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _last_step(rd: RunDir) -> int | None:
    last = complete_checkpoints(rd)
    return int(STEP_RE.match(last[-1].name).group(1)) if last else None


def _record(rd: RunDir, restarts: list[dict]) -> None:
    """The restarts, in the train manifest the last try wrote (its lock is released by now)."""
    m = rd.manifest("train")
    if m is None or not restarts:
        return
    m["restarts"] = restarts
    m.setdefault("headline", {})["restarts"] = len(restarts)
    atomic_write_json(rd.manifest_path("train"), m)
