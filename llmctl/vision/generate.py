"""`llmctl generate` with images: `--image PATH` (repeatable, paired with `-p` in order; without
`-p` each image gets data.image.prompt) and JSONL prompt files whose rows name an image,
`{"prompt": ..., "image": PATH}` or chat rows with `{"type": "image", "path"|"url"|"image": PATH}`
content parts. Images are checked as prepare checks them; the rails run on the text."""

from __future__ import annotations

import json
import time
from pathlib import Path

from llmctl.data.jsonl import read_jsonl
from llmctl.errors import ConfigError, DataError
from llmctl.vision import images as _img


def _parts(content, where: str) -> tuple[str, list[str]]:
    """(the text, the image paths) of a chat message's content (a string or a list of parts)."""
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise DataError(f"{where}: message content must be text or a list of parts")
    text, paths = [], []
    for p in content:
        kind = p.get("type") if isinstance(p, dict) else None
        if kind == "text":
            text.append(str(p.get("text", "")))
        elif kind in ("image", "image_url"):
            ref = p.get("path") or p.get("image") or p.get("url") or (p.get("image_url") or {}).get("url")
            if not isinstance(ref, str):
                raise DataError(f"{where}: an image part needs 'path' (a local file)")
            paths.append(ref.removeprefix("file://"))
        else:
            raise DataError(f"{where}: unknown content part {kind!r} (text or image)")
    return "\n".join(text), paths


def read_items(cfg, prompts: list[str], images: list[str], prompts_file: str | None) -> list[dict]:
    """[{prompt, image (path), where}] from --prompt/--image pairs and a JSONL prompts file."""
    if images and prompts and len(prompts) not in (1, len(images)):
        raise ConfigError(f"{len(images)} --image but {len(prompts)} --prompt: give one prompt per image (paired in order), or one for all")
    default = cfg.data.image.prompt
    items = [{"prompt": prompts[i] if len(prompts) == len(images) else (prompts[0] if prompts else default), "image": p, "where": f"--image {p}"}
             for i, p in enumerate(images)]
    f = prompts_file or cfg.generate.prompts_file
    if f:
        base = Path(f).parent
        for i, rec in read_jsonl(f):
            where = f"{f}:{i}"
            if isinstance(rec, dict) and isinstance(rec.get("messages"), list):
                user = [m for m in rec["messages"] if isinstance(m, dict) and m.get("role") == "user"]
                text, paths = _parts(user[-1].get("content") if user else "", where)
            elif isinstance(rec, dict) and isinstance(rec.get("image"), str):
                text, paths = str(rec.get("prompt") or default), [rec["image"]]
            else:
                raise DataError(f"{where}: expected {{prompt, image}} or 'messages' with an image part")
            if len(paths) != 1:
                raise DataError(f"{where}: {len(paths)} images: llmctl's image-text models take exactly one image a prompt")
            items.append({"prompt": text or default, "image": str(base / paths[0]) if not Path(paths[0]).is_absolute() else paths[0], "where": where})
    if not items:
        raise ConfigError("no images: pass --image PATH (with -p TEXT), or a --prompts-file JSONL whose rows name an image")
    return items


def run(cfg, rd, *, model: str | None, prompts: list[str], images: list[str], prompts_file: str | None, con) -> dict:
    from llmctl.generation import Sampling
    from llmctl.modeling import resolve_model_path
    from llmctl.rundir import atomic_write_text
    from llmctl.safety import CONTENT_FILTER, AuditLog, Blocked, Rails
    from llmctl.vision.infer import generate, load_model

    g = cfg.generate
    items = read_items(cfg, prompts, images, prompts_file)
    fix = "give a readable image file (PNG, JPEG, ...) within data.image.max_bytes and max_pixels"
    pics = [_img.load_checked(Path(it["image"]), it["where"], cfg.data.image.max_bytes, cfg.data.image.max_pixels, fix)[1] for it in items]
    audit = AuditLog(None)
    rails = Rails(cfg.safety, stage="generate", audit=audit)
    path = resolve_model_path(model, rd, cfg, "generate")
    mdl, proc = load_model(path)
    sp = Sampling(max_new_tokens=g.max_new_tokens, do_sample=g.do_sample, temperature=g.temperature, top_k=g.top_k, top_p=g.top_p,
                  repetition_penalty=g.repetition_penalty, stop=tuple(g.stop), seed=g.seed if g.seed is not None else cfg.run.seed)
    records, t0, n_tok = [], time.time(), 0
    with rd.begin("generate", cfg, inputs=[] if model else ["train"]) as st:
        for i, (it, pic) in enumerate(zip(items, pics)):
            try:
                text = rails.check_input(it["prompt"], f"prompt-{i}")
            except Blocked:
                records.append({"index": i, "prompt": it["prompt"], "image": it["image"], "output": "", "finish_reason": CONTENT_FILTER})
                continue
            r = generate(mdl, proc, [text], [pic], sp)[0]
            out, blocked = rails.check_output(r["text"], f"prompt-{i}", choice=0)
            n_tok += r["completion_tokens"]
            records.append({"index": i, "prompt": text, "image": it["image"], "output": out, "prompt_tokens": r["prompt_tokens"],
                            "completion_tokens": r["completion_tokens"], "finish_reason": CONTENT_FILTER if blocked else r["finish_reason"]})
            if not con.json_mode:
                print(out, flush=True)
        atomic_write_text(rd.outputs_path, "".join(json.dumps(r) + "\n" for r in records))
        atomic_write_text(rd.audit_path("generate"), "".join(json.dumps(e) + "\n" for e in audit.events))
        head = {"prompts": len(items), "outputs": len(records), "completion_tokens": n_tok, "seconds": round(time.time() - t0, 2)}
        st.headline.update(head)
    return {**head, "results": records} if con.json_mode else {**head, "outputs_file": str(rd.outputs_path)}
