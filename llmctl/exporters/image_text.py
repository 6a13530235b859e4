"""The hf export of an image-text model: a directory that loads with
AutoModelForImageTextToText and AutoProcessor, verified by reloading it that way and comparing
logits on a held-out image with the trained model's."""

from __future__ import annotations

from pathlib import Path

from llmctl.exporters.hf import TOLERANCE


def load_trained(model_dir: Path):
    """(model, processor) of RUN/train/model, in float32."""
    import torch
    from transformers import AutoModelForImageTextToText

    from llmctl.vision.infer import load_processor  # AutoProcessor, less a video part torchvision would need

    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, load_processor(model_dir)


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


def card(cfg, head: dict, evalr: dict, fmts=("hf",)) -> str:
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
    lines += ["", "## Files", "", "- `hf/`: this directory (AutoModelForImageTextToText + AutoProcessor)"]
    if "gguf" in fmts:  # llama.cpp's two-file form: every language model file goes with the one mmproj
        mp = f"gguf/mmproj-{mmproj_type(cfg.export.gguf_types)}.gguf"
        lines += [f"- `gguf/model-{q}.gguf`: the language model for llama.cpp ({q})" for q in cfg.export.gguf_types]
        lines += [f"- `{mp}`: the vision tower and projector for llama.cpp (mmproj), used with any of the above", "",
                  f"`llama-mtmd-cli -m gguf/model-{cfg.export.gguf_types[0]}.gguf --mmproj {mp} --image PIC -p \"{cfg.data.image.prompt}\" --temp 0 --jinja`",
                  "", "(`--jinja`: the prompt is formatted by the chat template in the language model file, the prompt this model was trained on.)"]
    return "\n".join(lines) + "\n"


def mmproj_type(gguf_types) -> str:
    """The mmproj's precision: f32 when the export writes an f32 language model, else f16."""
    return "f32" if "f32" in gguf_types else "f16"


def write_gguf(model, proc, out: Path, cfg, probe, con) -> tuple[dict, dict]:
    """llama.cpp's two files (llmctl/exporters/mmproj.py): `model-{type}.gguf` for each export.gguf_types
    entry and one `mmproj-{f32|f16}.gguf`. `probe` = (image, question, pixel_values) or None to skip
    checks. Returns (info, {sub-check: (diff, tolerance, extra checks)})."""
    import copy

    from llmctl.exporters import common, gguf as gguf_x, gguf_tokenizer, mmproj

    lm = mmproj.language_model(model)
    tok = copy.deepcopy(proc.tokenizer)  # the hf export keeps the processor as trained
    tok.chat_template = mmproj.chat_template(proc)  # llama.cpp formats a turn with it
    pre = gguf_x.check_supported(lm, tok)
    checks: dict = {}
    text = None
    if probe is not None:
        ids, mask = common.verify_batch(tok)
        text = (common.reference_logits(lm, ids, mask), ids, mask)
    for q in cfg.export.gguf_types:
        p = gguf_x.write(lm, tok, out, q, cfg.run.name, pre=pre)
        if text is not None:
            checks[q] = gguf_x.verify(p, *text, q, tok, lm, llama_cpp_tokenizer=not checks)
    mq = mmproj_type(cfg.export.gguf_types)
    mp = mmproj.write(model, proc, out, mq, cfg.run.name)
    if probe is not None:
        image, question, pixel_values = probe
        extra = {"read_back": mmproj.check_file(mp, model, proc, mq)}
        real = _llama_cpp_check(model, proc, out, mp, image, question, cfg, con)
        if real is not None:
            extra["llama_cpp_describe"] = real
        diff, scale = mmproj.features_diff(mp, model, pixel_values)
        checks["mmproj"] = (diff, gguf_x.TOLERANCE[mq] * scale, extra)
    info = {"types": list(cfg.export.gguf_types), "mmproj": mp.name, "mmproj_type": mq, "tokenizer_pre": pre,
            "tokenizer_hash": gguf_tokenizer.llama_cpp_hash(tok), "chat_template": tok.chat_template,
            "llama_cpp": f"llama-mtmd-cli -m {sorted(out.glob('model-*.gguf'))[0].name} --mmproj {mp.name} --image PIC -p TEXT --temp 0 --jinja"}
    return info, checks


def _llama_cpp_check(model, proc, out: Path, mmproj_path: Path, image, question: str, cfg, con) -> dict | None:
    """The real runtime, when llama-mtmd-cli is installed: its greedy answer about the probe image
    must be transformers' greedy answer, word for word. None without llama.cpp."""
    import subprocess

    from llmctl.exporters import mmproj
    from llmctl.exporters.gguf import llama_cpp
    from llmctl.generation import Sampling
    from llmctl.vision.infer import generate

    if llama_cpp("llama-mtmd-cli") is None:
        return None
    n = min(16, cfg.generate.max_new_tokens)
    pic = out.parent / f".probe-{out.name}.png"
    image.save(pic)
    model_gguf = out / f"model-{mmproj_path.stem.removeprefix('mmproj-')}.gguf"  # the same precision as the mmproj
    if not model_gguf.is_file():
        model_gguf = sorted(out.glob("model-*.gguf"))[0]
    want = generate(model, proc, [question], [image], Sampling(max_new_tokens=n, do_sample=False))[0]["text"].strip()
    try:
        got = mmproj.llama_cpp_describe(model_gguf, mmproj_path, pic, question, n).strip()
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        return {"passed": False, "error": str(e)}
    finally:
        pic.unlink(missing_ok=True)
    con.info(f"  gguf: llama-mtmd-cli {model_gguf.name} + {mmproj_path.name} on the probe image: {got!r} (transformers: {want!r})")
    # f32 files compute what the model computes: the answers must be the same. Rounded weights may
    # flip a near tie, which the logit checks above bound: recorded, not failed.
    strict = model_gguf.name == "model-f32.gguf" and mmproj_path.name == "mmproj-f32.gguf"
    return {"passed": got == want or not strict, "same": got == want, "strict": strict, "llama_cpp": got, "transformers": want,
            "max_new_tokens": n}
