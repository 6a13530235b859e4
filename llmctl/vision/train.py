"""`llmctl train` for data.format=image_text: train's own machinery (checkpoints, resume,
SIGTERM, time budget, torchrun, metrics) with an image-text model and its processor."""

from __future__ import annotations


def hooks():
    from llmctl.train.stage import Hooks
    from llmctl.vision.infer import load_processor
    from llmctl.vision.model import build

    return Hooks(build_model=build, processor=load_processor)
