"""`llmctl train`: RUN/prepare -> RUN/train/model, resumable, under torchrun unchanged.

Built on the Hugging Face Trainer (AdamW, schedules, accumulation, DDP/FSDP, exact resume).
llmctl adds: step-NNNNNN checkpoints that appear atomically, automatic resume with a
safety check, SIGTERM/SIGINT -> checkpoint -> exit 143/130, a wall-clock budget, NaN stop,
metrics.jsonl, progress, and rank-0-only writing. The machinery, shared with `llmctl distill`,
lives in llmctl/train/ (start with its stage.py).
"""

from __future__ import annotations

import time

from llmctl.config import parse_duration  # noqa: F401  (train.parse_duration, as before)
from llmctl.rundir import RunDir
from llmctl.train import stage as _stage
from llmctl.train.checkpoints import META, STEP_RE, complete_checkpoints, train_seed  # noqa: F401  (the stage's names, as before)
from llmctl.train.distributed import agree_any, collective_device  # noqa: F401
from llmctl.train.schedule import TimeFittedSchedule  # noqa: F401
from llmctl.train.build import Collator  # noqa: F401
from llmctl.train.stage import Hooks


def run(cfg, rd: RunDir, *, force: bool = False, nproc: int | None = None, hooks: Hooks | None = None, nodes: dict | None = None, **_) -> dict:
    """Train as the config says (or continue from the last checkpoint); the result's numbers.

    The clock is this module's `time`, read at each call, so a test can replace it."""
    if hooks is None and cfg.data.format == "image_text":
        from llmctl.vision.train import hooks as vision_hooks

        hooks = vision_hooks()
    return _stage.run(cfg, rd, force=force, nproc=nproc, hooks=hooks, clock=time.time, nodes=nodes)
