"""`llmctl explain --image`: which image patches a caption depends on. Gradient x input on the
vision tower's patch embeddings (summed over the embedding, absolute, scaled to the largest),
for log p(target | image, prompt); rendered as a heatmap over the image in explain.html."""

from __future__ import annotations

import base64
import html
import io
import math


def _patch_module(model):
    """The vision tower's patch-embedding module (CLIP/SigLIP `embeddings`, Qwen2-VL `patch_embed`)."""
    from llmctl.vision.model import part_of

    for name, mod in model.named_modules():
        if part_of(name) == "vision" and name.split(".")[-1] in ("embeddings", "patch_embed"):
            return mod
    raise ValueError(f"{type(model).__name__}: no patch embedding found in its vision tower")


def saliency(model, proc, image, question: str, target: str) -> tuple[list[list[float]], float, list[dict]]:
    """(patch saliency as a grid of the image's patches, scaled to max 1; log p(target); each target token's logprob).
    The target is written as training wrote answers (llmctl.vision.infer.answer_text: the model's chat template)."""
    import torch

    from llmctl.vision.infer import TOKEN_KEYS, answer_text, prompt_text

    tok = proc.tokenizer
    enc = proc(images=[image], text=[prompt_text(proc, question)], return_tensors="pt")
    tgt = tok(answer_text(proc, question, target), add_special_tokens=False)["input_ids"]
    ids = torch.cat([enc["input_ids"], torch.tensor([tgt])], dim=1)
    for k in TOKEN_KEYS:  # per-token inputs (Qwen2-VL's mm_token_type_ids): the target's tokens are text
        if k in enc:
            enc[k] = torch.cat([enc[k], enc[k].new_zeros((1, len(tgt)))], dim=1)
    kept = {}

    def hook(_m, _inp, out):
        out.retain_grad()
        kept["emb"] = out

    handle = _patch_module(model).register_forward_hook(hook)
    try:
        extra = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), **extra).logits[0].float()
    finally:
        handle.remove()
    n = enc["input_ids"].shape[1]
    lp = torch.log_softmax(logits[n - 1 : n - 1 + len(tgt)], dim=-1)
    picked = lp[torch.arange(len(tgt)), torch.tensor(tgt)]
    picked.sum().backward()
    emb = kept["emb"]
    sal = _patch_grid((emb.grad * emb).sum(-1).abs().detach(), enc, model)
    sal = sal / sal.max().clamp(min=1e-12)
    grid = [[round(float(x), 4) for x in row] for row in sal]
    tokens = [{"token": tok.decode([t]), "logprob": round(float(v), 4)} for t, v in zip(tgt, picked)]
    return grid, float(picked.sum()), tokens


def _patch_grid(sal, enc, model):
    """Per-patch saliency as a (rows, cols) grid in the image's layout."""
    if "image_grid_thw" in enc:  # Qwen2-VL: one flat row of patches, in merge_size x merge_size blocks
        t, h, w = (int(x) for x in enc["image_grid_thw"][0])
        m = model.config.vision_config.spatial_merge_size
        return sal.reshape(t, h // m, w // m, m, m).permute(0, 1, 3, 2, 4).reshape(t, h, w).mean(0)
    sal = sal[0]  # the first (only) image
    side = math.isqrt(sal.numel() - 1)
    if side * side == sal.numel() - 1:  # a CLS token first (CLIP): not a patch
        sal = sal[1:]
    side = math.isqrt(sal.numel())
    return sal[: side * side].reshape(side, side)


def render_html(image, res: dict, px: int = 256) -> str:
    """The image with the patch heatmap over it (red, opacity = saliency), and the target's tokens."""
    from PIL import Image

    buf = io.BytesIO()
    image.resize((px, px), Image.NEAREST).save(buf, format="PNG")
    src = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    grid = res["patch_saliency"]
    rows, cols = len(grid), len(grid[0])
    cells = "".join(f'<div title="patch ({r},{c}): {v:.3f}" style="background:rgba(230,0,0,{0.75 * v:.3f})"></div>'
                    for r, row in enumerate(grid) for c, v in enumerate(row))
    toks = "".join(f"<tr><td><code>{html.escape(repr(t['token']))}</code></td><td>{t['logprob']:.4f}</td></tr>" for t in res["target_tokens"])
    css = (f".wrap{{position:relative;width:{px}px;height:{px}px}} .wrap img{{position:absolute;width:{px}px;height:{px}px;image-rendering:pixelated}}"
           f" .grid{{position:absolute;inset:0;display:grid;grid-template-columns:repeat({cols},1fr);grid-template-rows:repeat({rows},1fr)}}"
           " body{font-family:sans-serif;margin:2em} td{padding:2px 8px}")
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>llmctl explain</title><style>{css}</style></head><body>'
            f"<h1>llmctl explain</h1><p>Prompt <code>{html.escape(repr(res['prompt']))}</code>, target <code>{html.escape(repr(res['target']))}</code>, "
            f"log p(target | image, prompt) = {res['target_logprob']:.4f}. Method: {html.escape(res['method'])}.</p>"
            f'<div class="wrap"><img alt="input image" src="{src}"><div class="grid">{cells}</div></div>'
            f"<h2>Target tokens</h2><table><tr><th>token</th><th>logprob</th></tr>{toks}</table></body></html>")


def run(cfg, rd, *, model: str | None, image_path: str, prompt: str, target: str | None, con) -> dict:
    import json
    from pathlib import Path

    from llmctl.generation import Sampling
    from llmctl.modeling import resolve_model_path
    from llmctl.rundir import atomic_write_text
    from llmctl.vision.images import load_checked
    from llmctl.vision.infer import generate, load_model

    fix = "give a readable image file (PNG, JPEG, ...)"
    image = load_checked(Path(image_path), f"--image {image_path}", cfg.data.image.max_bytes, cfg.data.image.max_pixels, fix)[1]
    path = resolve_model_path(model, rd, cfg, "explain")
    mdl, proc = load_model(path)
    if target is None:  # the model's own greedy caption
        target = generate(mdl, proc, [prompt], [image], Sampling(max_new_tokens=cfg.generate.max_new_tokens, stop=("\n",)))[0]["text"]
    if not target:
        raise ValueError("the model wrote nothing for this image: pass --target TEXT to explain a caption")
    grid, total, tokens = saliency(mdl, proc, image, prompt, target)
    res = {"prompt": prompt, "image": image_path, "target": target, "target_logprob": total, "target_tokens": tokens,
           "patch_saliency": grid, "method": "gradient x input on the vision tower's patch embeddings, |sum over the embedding|, scaled to the largest", "model": path}
    with rd.begin("explain", cfg, inputs=[] if model else ["train"]) as st:
        atomic_write_text(rd.explain_json_path, json.dumps(res, indent=2) + "\n")
        atomic_write_text(rd.explain_html_path, render_html(image, res))
        st.headline.update({"target": target, "target_logprob": round(total, 4)})
    if con.json_mode:
        return res
    if not con.quiet:
        for row in grid:
            con.info(" ".join(" .:-=+*#%@"[min(9, int(v * 9.999))] for v in row))
    return {"target": target, "target_logprob": round(total, 4), "html": str(rd.explain_html_path), "json": str(rd.explain_json_path)}
