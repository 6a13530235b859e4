"""`llmctl launch slurm CONFIG --nodes N --gpus-per-node G`: an sbatch script for the train stage.

One task per node (srun); each runs `llmctl train ... --nproc G --nnodes N --node-rank $SLURM_NODEID
--master-addr <first node>`, i.e. torchrun's static rendezvous on the first node (the form whose
restarts work). The run directory must be on storage every node sees: rank 0 writes the
checkpoints there and every rank reads them on resume. `--signal=TERM@120` makes Slurm send
SIGTERM two minutes before the time limit (and on preemption, after the grace time): every rank
saves a checkpoint, llmctl exits 143, and the script requeues the job, which resumes from it.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from llmctl.errors import ConfigError

TIME_RE = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")  # Slurm's forms: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM[:SS]


def check(nodes: int, gpus_per_node: int, time: str | None, port: int) -> None:
    if nodes < 1:
        raise ConfigError(f"--nodes {nodes}: give 1 or more")
    if gpus_per_node < 1:
        raise ConfigError(f"--gpus-per-node {gpus_per_node}: give 1 or more (one rank per GPU)")
    if time is not None and not TIME_RE.match(time):
        raise ConfigError(f"--time {time!r}: use Slurm's form, e.g. 4:00:00 (hours:minutes:seconds) or 2-00:00:00 (days-hours...)")
    if not 1 <= port <= 65535:
        raise ConfigError(f"--master-port {port}: must be 1..65535")


def train_line(cfg, root: Path, gpus_per_node: int) -> str:
    """The command each node runs (inside `bash -c`, so $SLURM_NODEID is that node's). The config and
    the run directory by absolute paths: other nodes start elsewhere. The user's --set flags are kept."""
    verb = "distill" if getattr(cfg, "distill", None) is not None else "train"
    args = ["llmctl", verb, str(Path(cfg.source).resolve())]
    for item in cfg.overrides:
        args += ["--set", item]
    args += ["--run-dir", str(root), "--nproc", str(gpus_per_node)]
    nodes = '--nnodes "$SLURM_NNODES" --node-rank "$SLURM_NODEID" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT"'
    return f"exec {shlex.join(args)} {nodes}"


def sbatch_script(cfg, root: Path, *, nodes: int, gpus_per_node: int, time: str | None = None, partition: str | None = None,
                  account: str | None = None, port: int = 29500) -> str:
    """The sbatch script, ready for `sbatch`."""
    check(nodes, gpus_per_node, time, port)
    root = root.resolve()
    (root / "logs").mkdir(parents=True, exist_ok=True)  # Slurm opens --output before the script runs
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", cfg.run.name)[:40] or "run"
    opts = [f"--job-name=llmctl-{name}", f"--nodes={nodes}", "--ntasks-per-node=1", f"--gpus-per-node={gpus_per_node}"]
    opts += [f"--time={time}"] if time else []
    opts += [f"--partition={partition}"] if partition else []
    opts += [f"--account={account}"] if account else []
    opts += ["--signal=TERM@120", "--requeue", "--open-mode=append", f"--output={root / 'logs' / 'slurm-%j.log'}"]
    head = [
        "#!/bin/bash",
        f"# {nodes} node(s) x {gpus_per_node} GPU(s): train {root} from {Path(cfg.source).resolve()}. Submit with: sbatch THIS_FILE",
        "# The run directory must be on storage every node sees (rank 0 writes the checkpoints; every rank reads them).",
        "# SIGTERM 120 s before the time limit or on preemption: each rank saves a checkpoint, llmctl exits 143,",
        "# the job requeues itself and resumes from that checkpoint.",
        *(f"#SBATCH {o}" for o in opts),
    ]
    body = [
        "",
        "# bash runs a trap only after srun returns: the requeue below still happens after a SIGTERM",
        "trap 'echo \"llmctl: SIGTERM, waiting for the checkpoint\"' TERM",
        'MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
        f"MASTER_PORT={port}",
        "export MASTER_ADDR MASTER_PORT",
        f"srun --kill-on-bad-exit=1 bash -c {shlex.quote(train_line(cfg, root, gpus_per_node))}",
        "rc=$?",
        'if [ "$rc" -eq 143 ]; then',
        '  echo "llmctl: interrupted after saving a checkpoint; requeueing job $SLURM_JOB_ID"',
        '  scontrol requeue "$SLURM_JOB_ID" || true',
        "fi",
        'exit "$rc"',
        "",
    ]
    return "\n".join(head + body)
