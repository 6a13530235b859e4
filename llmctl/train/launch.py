"""`llmctl train CONFIG --nproc N`: the same command as N ranks under torchrun."""

from __future__ import annotations

import os
import sys

from llmctl import console as _console
from llmctl.errors import LlmctlError
from llmctl.rundir import RunDir
from llmctl.train.checkpoints import interrupted


def launch_torchrun(nproc: int, rd: RunDir, resume_cmd: str) -> None:
    """Run this process's command line again as `nproc` ranks, and report their outcome.

    torchrun's own launcher runs in this process, so its outcome is ours to report: the
    ranks' exit codes, and Ctrl-C/SIGTERM (forwarded to every rank, which saves a
    checkpoint) as exit 130/143 with one line, not torchrun's traceback. Ranks print no
    result (LLMCTL_TORCHRUN=1): the caller reports rank 0's from the train manifest.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run as torchrun

    # A rank saving a checkpoint after the signal gets this long before it is killed.
    targs = ["--standalone", f"--nproc-per-node={nproc}", "--shutdown-timeout=600", "-m", "llmctl", *_without_nproc(sys.argv[1:])]
    _console.current().info("launching: torchrun " + " ".join(targs))
    _quiet_torch_distributed()
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # what torchrun sets, without its banner
    old_env = os.environ.get("LLMCTL_TORCHRUN")
    os.environ["LLMCTL_TORCHRUN"] = "1"
    try:
        torchrun(parse_args(targs))
    except SignalException as e:
        raise interrupted(e.sigval, rd, resume_cmd) from None
    except ChildFailedError as e:
        codes = {rank: f.exitcode for rank, f in sorted(e.failures.items())}
        first = next(iter(codes.values()))
        err = LlmctlError(f"train: rank(s) {', '.join(f'{r} (exit {c})' for r, c in codes.items())} failed; see the ranks' messages above")
        err.exit_code = first if first in (2, 3, 130, 143) else 1
        raise err from None
    finally:
        if old_env is None:
            os.environ.pop("LLMCTL_TORCHRUN", None)
        else:
            os.environ["LLMCTL_TORCHRUN"] = old_env


def _without_nproc(argv: list[str]) -> list[str]:
    """The command line less `--nproc N` / `--nproc=N`: each rank is one process."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        out.append(a)
    return out


def _quiet_torch_distributed() -> None:
    import logging

    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed"):  # its notices would interleave with ours
            logging.getLogger(name).setLevel(logging.ERROR)
