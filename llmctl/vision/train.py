"""`llmctl train` for data.format=image_text: train's own machinery (checkpoints, resume,
SIGTERM, time budget, torchrun, metrics) with an image-text model and its processor."""

from __future__ import annotations


def trainer_class():
    """The Trainer, resuming image-text weights through from_pretrained.

    transformers saves LLaVA-style models under their legacy key names (language_model.model...,
    converted on load by from_pretrained) while the Trainer's resume loads the file with
    load_state_dict(strict=False): every key missed, silently, and the run went on from random
    weights. Reading the checkpoint with from_pretrained applies the conversion; the load is strict."""
    from transformers import Trainer

    class ImageTextTrainer(Trainer):
        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            model = model if model is not None else self.model
            if hasattr(model, "peft_config"):  # an adapter checkpoint: the Trainer's own loader reads it
                return super()._load_from_checkpoint(resume_from_checkpoint, model)
            saved = type(model).from_pretrained(resume_from_checkpoint, dtype=next(model.parameters()).dtype)
            model.load_state_dict(saved.state_dict(), strict=True)

    return ImageTextTrainer


def hooks():
    from llmctl.train.stage import Hooks
    from llmctl.vision.infer import Collator, load_processor
    from llmctl.vision.model import build

    return Hooks(build_model=build, processor=load_processor, collator=Collator, trainer_class=trainer_class())
