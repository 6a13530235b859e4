"""`llmctl export`: RUN/train/model -> hf/, onnx/, gguf/ under RUN/export, each verified.

Everything is built in a staging folder; a format moves into place only after every
requested format has been reloaded and its logits compared with the trained model. The
manifest lists every file with its size and sha256, and each format's largest difference.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from llmctl import console as _console
from llmctl.errors import ConfigError, LlmctlError
from llmctl.rundir import RunDir, replace_path, sha256_file

FORMATS = ("hf", "onnx", "gguf", "hf-int8")


def _formats(cfg, override: list[str] | None) -> list[str]:
    fmts = list(override) if override else list(cfg.export.formats)
    for f in fmts:
        if f not in FORMATS:
            raise ConfigError(f"--format {f!r}: expected one of {', '.join(FORMATS)}")
    return list(dict.fromkeys(fmts))


def _model_card(cfg, rd: RunDir, fmts: list[str]) -> str:
    def read(p: Path) -> dict:
        try:
            return json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    stats = read(rd.stats_path)
    evalr = read(rd.results_path) if _own_fresh_eval(cfg, rd) else {}
    tm = rd.manifest("train") or {}
    pm = rd.manifest("prepare") or {}
    head = tm.get("headline", {})
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags: [llmctl]",
        "---",
        f"# {cfg.run.name}",
        "",
        "Trained and exported with [llmctl](https://pypi.org/project/llmctl/).",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'model = AutoModelForCausalLM.from_pretrained("PATH")',
        'tok = AutoTokenizer.from_pretrained("PATH")',
        "```",
        "",
        "## Training data",
        "",
        f"- source: {cfg.data.source} {cfg.data.hub_name or ''} {' '.join(cfg.data.paths)}".rstrip(),
        f"- format: {cfg.data.format}, block size {cfg.data.block_size}",
    ]
    for split, s in (stats.get("splits") or {}).items():
        lines.append(f"- {split}: {s.get('documents')} documents, {s.get('tokens')} tokens")
    lines += ["", "## Training", ""]
    arch = cfg.model.name_or_path or f"{cfg.model.arch}, {cfg.model.n_layers} layers, hidden {cfg.model.hidden_size}"
    lines.append(f"- model: {arch}; LoRA: {cfg.model.lora.enabled}")
    pref = tm.get("preference")
    if pref:  # preference tuning: the objective and what it was measured against
        lines.append(f"- method: {pref['method']} (beta {cfg.train.beta if cfg.train.beta is not None else 'default'}); "
                     f"reference model: {pref.get('reference_model') or 'none (reference-free loss)'}")
    for k in ("steps", "parameters", "train_loss", "init_val_ppl", "val_ppl", "tokens", "seconds"):
        if head.get(k) is not None:
            lines.append(f"- {k}: {head[k]}")
    lines += ["", "## Evaluation", ""]
    if evalr:
        p = evalr.get("perplexity") or {}
        g = evalr.get("generation") or {}
        pr, init = evalr.get("preference") or {}, evalr.get("init") or {}
        if pr:
            before = f" (the starting model: {init['preference_accuracy']})" if "preference_accuracy" in init else ""
            lines.append(f"- preference accuracy {pr.get('preference_accuracy')}{before}, reward margin {pr.get('reward_margin')} "
                         f"on {pr.get('pairs')} held-out pairs; mean answer tokens chosen {pr.get('chosen_tokens')}, rejected {pr.get('rejected_tokens')}")
        if p:
            lines.append(f"- perplexity {p.get('perplexity')} on {p.get('tokens')} tokens ({p.get('source')}), bits/byte {p.get('bits_per_byte')}")
        if g:
            lines.append(f"- BLEU {g.get('bleu')}, chrF {g.get('chrf')}, TER {g.get('ter')}, exact match {g.get('exact_match')} on {g.get('examples')} pairs")
            lines.append(f"- sacreBLEU: `{(g.get('signatures') or {}).get('bleu')}`")
        if g and "rougeL" in g:
            lines.append(f"- ROUGE-1/2/L {g.get('rouge1')}/{g.get('rouge2')}/{g.get('rougeL')}, token F1 {g.get('token_f1')}")
        for task, rec in (evalr.get("tasks") or {}).items():  # lm-eval tasks, every metric with its stderr
            shown = [f"{m} {v:.4f}" + (f" ± {rec[m + '_stderr']:.4f}" if isinstance(rec.get(m + "_stderr"), float) else "")
                     for m, v in rec.items() if isinstance(v, float) and "_stderr" not in m]
            lines.append(f"- lm-eval {task}: {', '.join(shown)} ({rec.get('samples')} questions, {rec.get('num_fewshot', 0)}-shot)")
    else:
        lines.append("- not evaluated (run `llmctl eval`)")
    lines += [
        "",
        "## Lineage",
        "",
        f"- prepare: id {pm.get('id')}, config hash {pm.get('config_hash')}, finished {pm.get('finished_at')}",
        f"- train: id {tm.get('id')}, config hash {tm.get('config_hash')}, finished {tm.get('finished_at')}",
        f"- exported formats: {', '.join(fmts)}; dtype {cfg.export.dtype}",
        "",
    ]
    return "\n".join(lines)


def _own_fresh_eval(cfg, rd: RunDir) -> bool:
    """Whether RUN/eval holds numbers of this run's current model (not another model's, not stale)."""
    m = rd.manifest("eval") or {}
    return m.get("status") == "complete" and "train" in (m.get("lineage") or {}) and rd.staleness("eval", cfg) is None


def _load_trained(cfg, rd: RunDir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(rd.model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(rd.model_dir)
    return model, tok


def _check_lora(cfg, rd: RunDir, model, ids, mask) -> float | None:
    """Merged weights must equal the adapter applied to its base."""
    if not (rd.adapter_dir / "adapter_config.json").is_file():
        return None
    from peft import PeftModel
    from transformers import AutoTokenizer

    from llmctl.exporters.common import max_diff, reference_logits
    from llmctl.modeling import build_from_scratch, load_pretrained_for_training

    tok = AutoTokenizer.from_pretrained(rd.model_dir)
    import torch

    base = load_pretrained_for_training(cfg, tok, torch.float32) if cfg.model.name_or_path else build_from_scratch(cfg, tok)
    adapted = PeftModel.from_pretrained(base, rd.adapter_dir).eval()
    return max_diff(reference_logits(adapted, ids, mask), reference_logits(model, ids, mask), mask)


def _check_line(v: dict) -> str:
    if "error" in v:
        return v["error"]
    if "llama_cpp" in v:  # the two-file GGUF of an image-text model, run by llama-mtmd-cli
        same = "the same" if v["same"] else ("different" if v["strict"] else "different: rounded weights, not a failure")
        return f"llama.cpp {v['llama_cpp']!r} vs transformers {v['transformers']!r} ({same})"
    if "tensors" in v:  # an mmproj read back
        return f"{v['keys']} keys and {v['tensors']} tensors read back as written" + (f"; {'; '.join(v['problems'])}" if v["problems"] else "")
    if "probes" in v:
        line = f"{v['probes'] - v['mismatched']}/{v['probes']} probe texts tokenized as the trained tokenizer does"
        return line + (f" (first difference: {v['first_mismatch']!r})" if v["mismatched"] else "")
    return f"max |logit diff| {v['max_abs_diff']:.3g} (tolerance {v['tolerance']:.3g})"


def _export_gguf(cfg, model, tok, out: Path, pre: str, reference, con) -> tuple[dict, dict]:
    """One file per export.gguf_types entry; `reference` = (logits, ids, mask), or None to skip checks."""
    from llmctl.exporters import gguf as gguf_x, gguf_tokenizer

    info = {"types": list(cfg.export.gguf_types), "tokenizer_pre": pre, "tokenizer_hash": gguf_tokenizer.llama_cpp_hash(tok), "kept_higher_precision": {}}
    checks = {}
    for q in cfg.export.gguf_types:
        p = gguf_x.write(model, tok, out, q, cfg.run.name, pre=pre)
        info["kept_higher_precision"][q] = kept = gguf_x.kept_higher_precision(p, q)
        if kept:
            con.info(f"  gguf:{q}: {len(kept)} tensors kept at higher precision (rows not a multiple of 32): {', '.join(sorted(kept))}")
        if reference is not None:
            checks[q] = gguf_x.verify(p, *reference, q, tok, model, llama_cpp_tokenizer=not checks)
    return info, checks


def _record_check(key: str, result: tuple, verification: dict, con) -> None:
    """Log and record one format's (diff, tolerance, further checks); raise if any failed."""
    diff, tol, extra = result
    passed = diff <= tol and all(v["passed"] for v in extra.values())
    verification[key] = {"max_abs_diff": diff, "tolerance": tol, "passed": passed, **extra}
    what = "image feature" if key.endswith(":mmproj") else "logit"  # an mmproj holds the tower and projector
    con.info(f"  {key}: max |{what} diff| {diff:.3g} (tolerance {tol:.3g})")
    for name, v in extra.items():
        con.info(f"  {key}: {name}: {_check_line(v)}")
    if not diff <= tol:
        raise LlmctlError(f"export {key} failed verification: {what}s differ by {diff:.4g} > tolerance {tol:.3g}; nothing was exported")
    for name, v in extra.items():
        if not v["passed"]:
            raise LlmctlError(f"export {key} failed verification: {name}: {_check_line(v)}; nothing was exported")


def run(cfg, rd: RunDir, *, force: bool = False, formats: list[str] | None = None, **_) -> dict:
    con = _console.current()
    fmts = _formats(cfg, formats)
    rd.require("train", cfg)
    if not force and rd.up_to_date("export", cfg):
        m = rd.manifest("export")
        if set(fmts) <= set(m.get("formats", [])):
            con.info(f"export: up to date in {rd.stage_dir('export')} (use --force to redo)")
            return {**m["headline"], "cached": True}
    if cfg.data.format == "image_text":
        return _image_text(cfg, rd, fmts, con)
    from llmctl.exporters import common, gguf as gguf_x

    model, tok = _load_trained(cfg, rd)
    pre = gguf_x.check_supported(model, tok) if "gguf" in fmts else None  # fail before any work
    check = cfg.export.verify
    ids, mask = common.verify_batch(tok)
    probe = (common.reference_logits(model, ids, mask), ids, mask) if check else None
    inputs = ["train"] + (["eval"] if _own_fresh_eval(cfg, rd) else [])
    report = None
    with rd.begin("export", cfg, inputs=inputs) as st:
        files, verification, timings = _export_all(cfg, rd, model, tok, fmts, pre, probe, con)
        st.manifest.update({"formats": fmts, "files": files, "verification": verification, "verified": check, "formats_info": timings})
        if not check:
            con.warn("export: export.verify is false: nothing was reloaded or compared with the trained model")
        head = _headline(fmts, files, timings, verification, check)
        if cfg.export.report:
            con.step("measuring each artifact (export.report: size, perplexity, decode tokens/s vs f32)")
            from llmctl import compression_report as report_x

            report = report_x.build(cfg, rd, tok, _report_artifacts(rd, fmts, cfg), con, export_seconds=sum(t["seconds"] for t in timings.values()))
            st.manifest["report"] = report
            for r in report["rows"]:
                if r.get("ppl_delta_pct") is not None:
                    head.setdefault("ppl_delta_pct", {})[r["name"]] = r["ppl_delta_pct"]
        st.headline.update(head)
    if report is not None:
        con.info("")
        for line in report_x.table(report):
            con.info(line)
    from llmctl.trackers import attach

    attach(rd, {"model_card": rd.export_dir("hf") / "README.md"}, {}, prefix="export")  # train.report_to's trackers
    return {**head, "dir": str(rd.stage_dir("export"))}


def _probe_image(rd: RunDir):
    """A held-out image of the run (its first validation or test pair), else a plain grey one."""
    from datasets import load_from_disk

    from llmctl.vision.infer import open_image

    if rd.pairs_dir.is_dir():
        for split in load_from_disk(str(rd.pairs_dir)).values():
            if len(split) and "image" in split.column_names:
                return open_image(split[0]["image"]), split[0]["prompt"]
    from PIL import Image

    return Image.new("RGB", (32, 32), (128, 128, 128)), "Describe the image."


def _image_text(cfg, rd: RunDir, fmts: list[str], con) -> dict:
    """hf and gguf (llama.cpp's model + mmproj) for an image-text model (llmctl/exporters/image_text.py,
    mmproj.py); what llama.cpp cannot run as trained, and the other formats, refused before any work."""
    from llmctl.checks import model_type
    from llmctl.export_support import check_image_text_formats
    from llmctl.exporters import image_text as it

    pretrained = cfg.model.name_or_path is not None
    check_image_text_formats(fmts, tower=None if pretrained else cfg.model.vision.tower, model_type=model_type(cfg)[0] if pretrained else None)
    model, proc = it.load_trained(rd.model_dir)
    if "gguf" in fmts:
        from llmctl.exporters import mmproj

        mmproj.check_supported(model, proc)  # the loaded model in full, still before any work
    image, question = _probe_image(rd)
    inputs = it.probe_inputs(proc, image, question) if cfg.export.verify else None
    ref = it.logits(model, inputs) if inputs is not None else None
    evalr = json.loads(rd.results_path.read_text()) if _own_fresh_eval(cfg, rd) and rd.results_path.is_file() else {}
    build = rd.stage_dir("export") / f".build.tmp-{int(time.time())}"
    with rd.begin("export", cfg, inputs=["train"] + (["eval"] if evalr else [])) as st:
        build.mkdir(parents=True)
        verification, timings = {}, {}
        try:
            for fmt in fmts:
                t0 = time.time()
                con.step(f"exporting {fmt}")
                (build / fmt).mkdir()
                if fmt == "hf":
                    info = it.write(model, proc, build / "hf", cfg, it.card(cfg, (rd.manifest("train") or {}).get("headline", {}), evalr, fmts))
                    checks = {"": (*it.verify(build / "hf", ref, image, question, cfg), {})} if ref is not None else {}
                else:
                    probe = (image, question, inputs["pixel_values"]) if inputs is not None else None
                    info, checks = it.write_gguf(model, proc, build / "gguf", cfg, probe, con)
                for sub, result in checks.items():
                    _record_check(f"{fmt}:{sub}" if sub else fmt, result, verification, con)
                timings[fmt] = {"seconds": round(time.time() - t0, 2), **info}
            for fmt in fmts:
                replace_path(build / fmt, rd.export_dir(fmt))
        finally:
            shutil.rmtree(build, ignore_errors=True)
        files = {str(f.relative_to(rd.stage_dir("export"))): {"size": f.stat().st_size, "sha256": sha256_file(f)}
                 for fmt in fmts for f in sorted(rd.export_dir(fmt).rglob("*")) if f.is_file()}
        st.manifest.update({"formats": fmts, "files": files, "verification": verification, "verified": ref is not None, "formats_info": timings})
        head = _headline(fmts, files, timings, verification, ref is not None)
        st.headline.update(head)
    return {**head, "dir": str(rd.stage_dir("export"))}


def _export_all(cfg, rd: RunDir, model, tok, fmts: list[str], pre, probe, con) -> tuple[dict, dict, dict]:
    """Write and verify every format in a build folder, then move each into place with its
    checksums: (files, verification, timings). A failed check leaves nothing behind."""
    build = rd.stage_dir("export") / f".build.tmp-{int(time.time())}"
    build.mkdir()
    verification: dict = {}
    timings: dict = {}
    try:
        lora = _check_lora(cfg, rd, model, probe[1], probe[2]) if probe else None
        if lora is not None:
            verification["lora_merge"] = {"max_abs_diff": lora, "tolerance": 1e-4, "passed": lora <= 1e-4}
            if lora > 1e-4:
                raise LlmctlError(f"LoRA merge check failed: merged model differs from adapter+base by {lora:.3g} (tolerance 1e-4)")
        for fmt in fmts:
            t0 = time.time()
            out = build / fmt
            out.mkdir()
            con.step(f"exporting {fmt}")
            info, checks = _export_one(fmt, cfg, rd, model, tok, out, fmts, pre, probe, con)
            for sub, result in checks.items():
                _record_check(f"{fmt}:{sub}" if sub else fmt, result, verification, con)
            timings[fmt] = {"seconds": round(time.time() - t0, 2), **info}
        files = {}
        for fmt in fmts:
            replace_path(build / fmt, rd.export_dir(fmt))
            for f in sorted(rd.export_dir(fmt).rglob("*")):
                if f.is_file():
                    files[str(f.relative_to(rd.stage_dir("export")))] = {"size": f.stat().st_size, "sha256": sha256_file(f)}
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return files, verification, timings


def _export_one(fmt: str, cfg, rd: RunDir, model, tok, out: Path, fmts: list[str], pre, probe, con) -> tuple[dict, dict]:
    """Write one format into `out`: (its info, {sub-check: (diff, tolerance, extra checks)})."""
    from llmctl.exporters import hf as hf_x, onnx as onnx_x

    checks: dict = {}
    if fmt == "hf":
        info = hf_x.write(model, tok, out, cfg, _model_card(cfg, rd, fmts))
        if probe:
            checks[""] = (*hf_x.verify(out, *probe, cfg), {})
    elif fmt == "onnx":
        info = onnx_x.write(model, tok, out, cfg)
        if probe:
            checks[""] = (*onnx_x.verify(out, *probe, cfg), {})
    elif fmt == "hf-int8":
        from llmctl import quantize as quant

        info = quant.save_hf_int8(rd.model_dir, out)
        tok.save_pretrained(out)
        hf_x._compat_tokenizer_config(out)
        if probe:
            checks[""] = (*hf_x.verify_int8(out, *probe), {})
    else:
        info, checks = _export_gguf(cfg, model, tok, out, pre, probe, con)
    return info, checks


def _headline(fmts: list[str], files: dict, timings: dict, verification: dict, check: bool) -> dict:
    head: dict = {"formats": ",".join(fmts)}
    for fmt in fmts:
        size = sum(v["size"] for k, v in files.items() if k.startswith(fmt + "/"))
        head[f"{fmt}_mb"] = round(size / 1e6, 3)
        head[f"{fmt}_s"] = timings[fmt]["seconds"]
    head["verified"] = check
    head["max_abs_diff"] = {k: float(f"{v['max_abs_diff']:.3g}") for k, v in verification.items()}
    return head


def _report_artifacts(rd: RunDir, fmts: list[str], cfg) -> list[dict]:
    """The rows of the compression report: f32 reference first, then each artifact."""
    rows = [{"name": "f32 (train/model)", "path": rd.model_dir, "kind": "hf"}]
    if "hf" in fmts:
        rows.append({"name": f"hf ({cfg.export.dtype})", "path": rd.export_dir("hf"), "kind": "hf"})
    if "hf-int8" in fmts:
        rows.append({"name": "hf-int8", "path": rd.export_dir("hf-int8"), "kind": "hf"})
    if "gguf" in fmts:
        for p in sorted(rd.export_dir("gguf").glob("*.gguf")):
            rows.append({"name": f"gguf {p.stem.removeprefix('model-')}", "path": p, "kind": "gguf"})
    rows.append({"name": "f32 --quantize int8", "path": rd.model_dir, "kind": "runtime", "quantize": "int8"})
    return rows
