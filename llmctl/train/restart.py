"""`train.max_restarts`: a crashed run continues from its last checkpoint by itself.

In one process, `supervise` runs the run's resume command (same config, --set flags, run
directory) as a child and starts it again after a crash; the child resumes exactly from the
last checkpoint, as any re-run does. Under torchrun the restarts are torchrun's own
`--max-restarts` (llmctl.train.launch). Each restart is logged with its cause and listed in
the train manifest's `restarts`.

Not retried, because a restart would fail the same way or undo the user's decision: SIGINT and
SIGTERM; exits 2-4 (config, data, input stage); an error llmctl explained (a NaN loss, a lock);
a child that failed before it opened the train stage.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys

from llmctl import console as _console
from llmctl import errors
from llmctl.errors import LlmctlError
from llmctl.rundir import RunDir, atomic_write_json, now_iso
from llmctl.train.checkpoints import STEP_RE, complete_checkpoints, interrupted

SUPERVISED = "LLMCTL_SUPERVISED"  # set in the supervised child: it trains, and leaves reporting to the supervisor
EXPLAINED = {c.__name__ for c in vars(errors).values() if isinstance(c, type) and issubclass(c, LlmctlError)}
STOPS = (signal.SIGINT, signal.SIGTERM)


def supervises(cfg, nproc: int, nnodes: int) -> bool:
    """Whether this process is the one-process supervisor (not a rank, not already supervised)."""
    return (cfg.train.max_restarts > 0 and nproc == 1 and nnodes == 1 and "LOCAL_RANK" not in os.environ
            and os.environ.get(SUPERVISED) != "1")


def supervise(cfg, rd: RunDir, resume_cmd: str, force: bool) -> dict:
    """Run the training as a child until it succeeds, stops for a reason a restart cannot fix,
    or has been restarted `train.max_restarts` times; the train manifest's headline."""
    con = _console.current()
    base = [sys.executable, "-m", "llmctl", *shlex.split(resume_cmd)[1:], *(["--quiet"] if con.quiet else [])]
    limit = cfg.train.max_restarts
    restarts: list[dict] = []
    while True:
        code, pid, sig = _run_child(base + (["--force"] if force and not restarts else []))
        if code == 0:
            break
        if sig is not None or -code in STOPS or code - 128 in STOPS:
            _record(rd, restarts)
            raise interrupted(sig or (-code if code < 0 else code - 128), rd, resume_cmd)
        cause = _crash_cause(code, pid, rd)
        if cause is None or len(restarts) >= limit:
            _record(rd, restarts)
            err = LlmctlError(f"train failed (exit {code}) " + (f"after its restarts were used up ({len(restarts)}/{limit})" if cause else
                              "with an error a restart would repeat: not retried") + "; see its message above")
            err.exit_code = code if code in (1, 2, 3, 4) else 1
            raise err
        step = _last_step(rd)
        restarts.append({"at": now_iso(), "cause": cause, "exit_code": code, "resumed_from_step": step})
        con.warn(f"train: restart {len(restarts)}/{limit} after {cause}; resuming from "
                 + (f"step {step}" if step is not None else "the start (no checkpoint yet)"))
    _record(rd, restarts)
    return {**(rd.manifest("train") or {}).get("headline", {})}


def _run_child(cmd: list[str]) -> tuple[int, int, int | None]:
    """(exit code, pid, the stop signal this supervisor forwarded or None). SIGTERM/SIGINT reach the
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
    return code, proc.pid, (got[0] if got else None)


def _crash_cause(code: int, pid: int, rd: RunDir) -> str | None:
    """Why the child died, if a restart can help; None if it cannot."""
    if code < 0:
        return f"the process was killed by {signal.Signals(-code).name}"
    if code in (2, 3, 4):
        return None
    m = rd.manifest("train") or {}
    if m.get("pid") != pid:
        return None  # it failed before it opened the stage: it would again
    error = str(m.get("error") or "")
    if error.split(":", 1)[0] in EXPLAINED:
        return None
    return f"exit {code} ({error[:200] or 'no error recorded'})"


def _last_step(rd: RunDir) -> int | None:
    last = complete_checkpoints(rd)
    return int(STEP_RE.match(last[-1].name).group(1)) if last else None


def _record(rd: RunDir, restarts: list[dict]) -> None:
    """The restarts, in the train manifest the last child wrote (its lock is released by now)."""
    m = rd.manifest("train")
    if m is None or not restarts:
        return
    m["restarts"] = restarts
    m.setdefault("headline", {})["restarts"] = len(restarts)
    atomic_write_json(rd.manifest_path("train"), m)
