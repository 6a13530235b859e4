"""The hf export of an image-text model: a directory that loads with
AutoModelForImageTextToText and AutoProcessor, verified by reloading it that way and comparing
logits on a held-out image with the trained model's."""

from __future__ import annotations

from pathlib import Path

from llmctl.exporters.hf import TOLERANCE


def load_trained(model_dir: Path):
    """(model, processor) of RUN/train/model, in float32."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(model_dir)


def probe_inputs(proc, image, question: str) -> dict:
    """The processor's tensors for one prompt with its image: what a user's first call looks like."""
    from llmctl.vision.infer import prompt_text

    return dict(proc(images=[image], text=[prompt_text(proc, question)], return_tensors="pt"))


def logits(model, inputs: dict):
    import torch

    with torch.no_grad():
        return model(**inputs).logits.float()


def write(model, proc, out: Path, cfg, card: str) -> dict:
    """Save a cast copy (the trained model keeps its float32 weights), the processor, the card."""
    import copy

    import torch

    dtype = getattr(torch, cfg.export.dtype)
    saved = model if model.dtype == dtype else copy.deepcopy(model).to(dtype)
    saved.config.dtype = cfg.export.dtype
    saved.save_pretrained(out, max_shard_size=cfg.export.max_shard_size)
    del saved
    proc.save_pretrained(out)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)
    (out / "README.md").write_text(card, encoding="utf-8")
    return {"dtype": cfg.export.dtype, "loads_with": "AutoModelForImageTextToText + AutoProcessor"}


def verify(out: Path, ref, image, question: str, cfg) -> tuple[float, float]:
    """Reload `out` as a user would (its own processor too) and compare logits: (max |diff|, tolerance)."""
    model, proc = load_trained(out)
    got = logits(model, probe_inputs(proc, image, question))
    if got.shape != ref.shape:
        return float("inf"), TOLERANCE[cfg.export.dtype]
    return float((got - ref).abs().max()), TOLERANCE[cfg.export.dtype]


def card(cfg, head: dict, evalr: dict) -> str:
    g = evalr.get("generation") or {}
    lines = ["---", "library_name: transformers", "pipeline_tag: image-text-to-text", "tags: [llmctl]", "---", f"# {cfg.run.name}", "",
             "An image-text model trained and exported with llmctl.", "", "```python",
             "from transformers import AutoModelForImageTextToText, AutoProcessor",
             'model = AutoModelForImageTextToText.from_pretrained("PATH")', 'processor = AutoProcessor.from_pretrained("PATH")', "```", "",
             "## Training", "", f"- data: {cfg.data.source} {' '.join(cfg.data.paths)}, format image_text".rstrip()]
    for k in ("steps", "parameters", "val_loss", "seconds"):
        if head.get(k) is not None:
            lines.append(f"- {k}: {head[k]}")
    if g:
        b = evalr.get("baselines") or {}
        lines += ["", "## Evaluation", "", f"- exact match {g.get('exact_match')}, BLEU {g.get('bleu')} on {g.get('examples')} held-out images "
                  f"(most frequent training caption: exact match {b.get('baseline_majority_exact_match')}, BLEU {b.get('baseline_majority_bleu')})"]
    return "\n".join(lines) + "\n"
