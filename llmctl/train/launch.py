"""`llmctl train CONFIG --nproc N [--nnodes M ...]`: the same command as ranks under torchrun.

One node: `--standalone` (c10d on a free localhost port, a fresh rendezvous id). With
`train.max_restarts`, a crashed group is relaunched whole, each time a new torchrun with a new
`--standalone` rendezvous (llmctl.train.restart); torchrun's own `--max-restarts` is not used: on
gloo its restarted round reconnected to the dead round's addresses and failed or hung. Several
nodes: torchrun's static form (`--node-rank`, `--master-addr`, `--master-port`) or its c10d
rendezvous (`--rdzv-endpoint`, `--rdzv-id`), passed through as given, and no restarts (each node's
launcher cannot relaunch the others' ranks). No home-made distributed machinery.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from contextlib import contextmanager
from dataclasses import dataclass

from llmctl import console as _console
from llmctl.errors import ConfigError, LlmctlError
from llmctl.rundir import RunDir
from llmctl.train.checkpoints import interrupted
from llmctl.train.restart import Failure, exit_code, restarts

# The launcher's own flags: each rank is one process of the group, so its command line has none.
LAUNCH_FLAGS = ("--nproc", "--nnodes", "--node-rank", "--master-addr", "--master-port", "--rdzv-endpoint", "--rdzv-id")


@dataclass(frozen=True)
class Nodes:
    """Where this launcher's ranks sit among all the nodes (command-line flags, checked)."""

    nnodes: int = 1
    node_rank: int | None = None
    master_addr: str | None = None
    master_port: int | None = None
    rdzv_endpoint: str | None = None
    rdzv_id: str | None = None

    @property
    def given(self) -> bool:
        return self != Nodes()

    def check(self) -> "Nodes":
        if self.nnodes < 1:
            raise ConfigError(f"--nnodes {self.nnodes}: give 1 or more nodes")
        if self.rdzv_endpoint and (self.node_rank is not None or self.master_addr):
            raise ConfigError("--rdzv-endpoint is the c10d rendezvous; --node-rank/--master-addr the static one: give one form")
        if self.rdzv_endpoint and ":" not in self.rdzv_endpoint:
            raise ConfigError(f"--rdzv-endpoint {self.rdzv_endpoint}: give HOST:PORT (e.g. node1:29400)")
        if self.nnodes > 1 and not self.rdzv_endpoint and (self.node_rank is None or not self.master_addr):
            raise ConfigError(f"--nnodes {self.nnodes}: also give --node-rank R and --master-addr HOST (rank 0's node; "
                              "--master-port, default 29500), or --rdzv-endpoint HOST:PORT --rdzv-id ID")
        if self.node_rank is not None and not 0 <= self.node_rank < self.nnodes:
            raise ConfigError(f"--node-rank {self.node_rank}: must be 0..{self.nnodes - 1} for --nnodes {self.nnodes}")
        return self

    def flags(self) -> list[str]:
        """The flags as the user gives them (for the resume command each node prints)."""
        pairs = [("--nnodes", self.nnodes if self.given else None), ("--node-rank", self.node_rank), ("--master-addr", self.master_addr),
                 ("--master-port", self.master_port), ("--rdzv-endpoint", self.rdzv_endpoint), ("--rdzv-id", self.rdzv_id)]
        return [x for k, v in pairs if v is not None for x in (k, str(v))]


def torchrun_args(nproc: int, nodes: Nodes) -> list[str]:
    """torchrun's rendezvous and process flags for this launcher."""
    if nodes.rdzv_endpoint:
        where = [f"--nnodes={nodes.nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={nodes.rdzv_endpoint}",
                 f"--rdzv-id={nodes.rdzv_id or 'llmctl'}"]
    elif nodes.given:
        where = [f"--nnodes={nodes.nnodes}", f"--node-rank={nodes.node_rank or 0}", f"--master-addr={nodes.master_addr or '127.0.0.1'}",
                 f"--master-port={nodes.master_port or 29500}"]
    else:
        where = ["--standalone"]
    # A rank saving a checkpoint after the signal gets this long before it is killed.
    return [*where, f"--nproc-per-node={nproc}", "--shutdown-timeout=600"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_torchrun(nproc: int, rd: RunDir, resume_cmd: str, nodes: Nodes = Nodes(), max_restarts: int = 0) -> None:
    """Run this process's command line again as `nproc` ranks on this node, and report their outcome.

    torchrun's own launcher runs in this process, so its outcome is ours to report: the
    ranks' exit codes, and Ctrl-C/SIGTERM (forwarded to every rank, which saves a
    checkpoint) as exit 130/143 with one line, not torchrun's traceback. Ranks print no
    result (LLMCTL_TORCHRUN=1): the caller reports rank 0's from the train manifest.
    With `max_restarts` on one node, a crashed group runs again, whole, on a fresh rendezvous.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException

    con = _console.current()
    argv = rank_argv(sys.argv[1:])
    if max_restarts and nodes.given:
        con.warn("train.max_restarts is not applied with node flags (--nnodes, --master-addr, --rdzv-endpoint): each node's launcher cannot relaunch "
                 "the other nodes' ranks. After a crash every node exits non-zero; running the same command again on every node "
                 "resumes exactly from the last checkpoint")

    def attempt(first: bool) -> list[Failure]:
        # A restart continues from the checkpoints: --force would delete them.
        return _torchrun(nproc, nodes, argv if first else [a for a in argv if a != "--force"])

    _quiet_torch_distributed()
    try:
        with _as_launcher():
            if max_restarts and not nodes.given:
                restarts(rd, max_restarts, resume_cmd, attempt)
                return
            failures = attempt(True)
    except SignalException as e:
        raise interrupted(e.sigval, rd, resume_cmd) from None
    if failures:
        err = LlmctlError(f"train: {'; '.join(map(str, failures))}; see the ranks' messages above")
        err.exit_code = exit_code(failures)
        raise err


def _torchrun(nproc: int, nodes: Nodes, argv: list[str]) -> list[Failure]:
    """One torchrun launch of the ranks in this process; the ranks that failed (none: success).
    Its signal handlers stay in place, so a stop between two launches is a SignalException too."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run as torchrun

    targs = [*torchrun_args(nproc, nodes), "-m", "llmctl", *argv]
    _console.current().info("launching: torchrun " + " ".join(targs))
    try:
        torchrun(parse_args(targs))
    except ChildFailedError as e:
        return [Failure(f.exitcode, r, f.pid) for r, f in sorted(e.failures.items())]
    return []


@contextmanager
def _as_launcher():
    """The environment the ranks inherit: no result printed by rank 0 (LLMCTL_TORCHRUN=1: the
    launcher reports), and one OpenMP thread each as torchrun sets, without its banner."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    old = os.environ.get("LLMCTL_TORCHRUN")
    os.environ["LLMCTL_TORCHRUN"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("LLMCTL_TORCHRUN", None)
        else:
            os.environ["LLMCTL_TORCHRUN"] = old


def rank_argv(argv: list[str]) -> list[str]:
    """The command line less the launcher's flags (`--nproc N`, `--nnodes=N`, ...): each rank is one process."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in LAUNCH_FLAGS:
            skip = True
            continue
        if a.split("=", 1)[0] in LAUNCH_FLAGS and "=" in a:
            continue
        out.append(a)
    return out


def _quiet_torch_distributed() -> None:
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed"):  # its notices would interleave with ours
            logging.getLogger(name).setLevel(logging.ERROR)
