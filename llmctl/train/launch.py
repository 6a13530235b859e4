"""`llmctl train CONFIG --nproc N [--nnodes M ...]`: the same command as ranks under torchrun.

One node: `--standalone` (c10d on localhost), or, with `train.max_restarts`, the static form on
127.0.0.1 (torchrun's restarts work reliably with static rendezvous; with c10d a crash after
`init_process_group` left the new round unable to connect). Several nodes: torchrun's static form
(`--node-rank`, `--master-addr`, `--master-port`) or its c10d rendezvous (`--rdzv-endpoint`,
`--rdzv-id`), passed through as given. No home-made distributed machinery.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from dataclasses import dataclass

from llmctl import console as _console
from llmctl.errors import ConfigError, LlmctlError
from llmctl.rundir import RunDir, atomic_write_json, now_iso
from llmctl.train.checkpoints import interrupted

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


def torchrun_args(nproc: int, nodes: Nodes, max_restarts: int) -> list[str]:
    """torchrun's rendezvous, process and restart flags for this launcher."""
    if nodes.rdzv_endpoint:
        where = [f"--nnodes={nodes.nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={nodes.rdzv_endpoint}",
                 f"--rdzv-id={nodes.rdzv_id or 'llmctl'}"]
    elif nodes.given:
        where = [f"--nnodes={nodes.nnodes}", f"--node-rank={nodes.node_rank or 0}", f"--master-addr={nodes.master_addr or '127.0.0.1'}",
                 f"--master-port={nodes.master_port or 29500}"]
    elif max_restarts:
        where = ["--nnodes=1", "--node-rank=0", "--master-addr=127.0.0.1", f"--master-port={free_port()}"]
    else:
        where = ["--standalone"]
    # A rank saving a checkpoint after the signal gets this long before it is killed.
    return [*where, f"--nproc-per-node={nproc}", "--shutdown-timeout=600", *([f"--max-restarts={max_restarts}"] if max_restarts else [])]


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
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run as torchrun

    targs = [*torchrun_args(nproc, nodes, max_restarts), "-m", "llmctl", *rank_argv(sys.argv[1:])]
    _console.current().info("launching: torchrun " + " ".join(targs))
    _quiet_torch_distributed()
    restarts = _RestartLog(max_restarts)
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
        used = f" after {len(restarts.records)} restart(s)" if restarts.records else ""
        err = LlmctlError(f"train: rank(s) {', '.join(f'{r} (exit {c})' for r, c in codes.items())} failed{used}; see the ranks' messages above")
        err.exit_code = first if first in (2, 3, 130, 143) else 1
        raise err from None
    finally:
        restarts.finish(rd, first_node=nodes.node_rank in (None, 0))
        if old_env is None:
            os.environ.pop("LLMCTL_TORCHRUN", None)
        else:
            os.environ["LLMCTL_TORCHRUN"] = old_env


class _RestartLog(logging.Handler):
    """torchrun's agent restarting the worker group: one warning each, with the failure that caused
    it, and the list in the train manifest (`restarts`) once the launch ends."""

    AGENT, PROCS = "torch.distributed.elastic.agent.server.api", "torch.distributed.elastic.multiprocessing.api"

    def __init__(self, max_restarts: int):
        super().__init__(logging.INFO)
        self.max_restarts, self.records, self.cause = max_restarts, [], "a rank failed"
        self.agent = logging.getLogger(self.AGENT)
        self.saved = (self.agent.level, self.agent.propagate)
        if max_restarts:
            _console.current().warn("train.max_restarts under torchrun: its restart of a gloo group failed to reconnect (or hung) "
                                    "in llmctl's tests on CPU; if a restart stalls, stop it and resume by hand")
            self.agent.setLevel(logging.INFO)  # its restart notice is INFO; we print our own line instead
            self.agent.propagate = False
            self.agent.addHandler(self)
            logging.getLogger(self.PROCS).addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if msg.startswith("failed (exitcode"):  # "failed (exitcode: -9) local_rank: 1 (pid: N) of binary: ..."
            self.cause = msg.split(" of ", 1)[0]
        elif "attempts left" in msg:
            self.records.append({"at": now_iso(), "cause": self.cause})
            _console.current().warn(f"train: restart {len(self.records)}/{self.max_restarts} by torchrun after a rank {self.cause}; "
                                    "the ranks resume from the last checkpoint")

    def finish(self, rd: RunDir, first_node: bool) -> None:
        if self.max_restarts:
            self.agent.removeHandler(self)
            logging.getLogger(self.PROCS).removeHandler(self)
            self.agent.setLevel(self.saved[0])
            self.agent.propagate = self.saved[1]
        m = rd.manifest("train") if rd is not None and first_node and self.records else None
        if m is not None:
            m["restarts"] = self.records
            m.setdefault("headline", {})["restarts"] = len(self.records)
            atomic_write_json(rd.manifest_path("train"), m)


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
