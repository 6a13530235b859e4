"""Compression: each quantized type's size, perplexity delta and decode tokens/s against f32.

On a trained quickstart-like model (the quickstart's architecture and tokenizer, trained
briefly on the builtin corpus; or a run you trained: LLMCTL_BENCH_RUN=runs/quickstart,
whose config is reused), in one run:

- `llmctl export` of every GGUF type this llmctl writes, hf-int8, and its compression
  report: size, ratio to f32, perplexity on the validation split and the delta to f32;
- our own single-stream greedy decode tokens/s with `--quantize int8` and `int4` against
  f32 (llmctl.modeling.load_for_inference, llmctl.generation): the sides alternate ROUNDS
  times and each keeps its best, because on a shared machine noise is larger than the
  difference being measured;
- the same decode comparison on a larger random llama (SCALE) to show where int8 pays off,
  and each Linear shape of both models alone (one token, f32 vs the dynamic int8 Linear);
- each GGUF file's decode tokens/s in llama.cpp itself (llama-server's timings), when found.

Targets: --quantize int8 >= 1.5x f32 decode with |delta perplexity| <= 1%; gguf q8_0 within 1%.

    .venv/bin/python bench/compress.py      # writes bench/results/compress.json (~10 min)

At real size (`--size 85m`: bench/_model.py's trained 85M llama, its run reused) it measures what
#26 asks there, in one run: `llmctl export` of gguf f32, q8_0 and q4_0 with the compression report
(f32, each GGUF, `--quantize int8`, on the first REAL_PPL_TOKENS validation tokens); llama.cpp's own
`llama-perplexity` on each GGUF (the same text, chunks of the model's block size); single-stream
decode f32 vs int8 (ours) and each GGUF's in llama-server. The model's training is reported beside.

    .venv/bin/python bench/compress.py --size 85m   # ~15 min on 2 busy cores; bench/results/compress-85m.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from common import HERE, machine, ratio, write_result

NEW, ROUNDS = 48, 5
TRAIN_STEPS = int(os.environ.get("LLMCTL_BENCH_COMPRESS_STEPS", "300"))
SCALE = {"hidden": 512, "layers": 8}  # ~15M parameters (bench/_model.py: MLP 352, vocab ~4096)


def _cli(*args: str) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "llmctl", *args], check=True, cwd=HERE.parent, env=env)


def trained_run() -> tuple[Path, str]:
    """(config path, what it is): LLMCTL_BENCH_RUN's config, or a briefly trained quickstart."""
    given = os.environ.get("LLMCTL_BENCH_RUN")
    if given:
        cfg = Path(given) / "train" / "config.yaml"
        if not cfg.is_file():
            sys.exit(f"LLMCTL_BENCH_RUN={given}: no train/config.yaml (train it first)")
        data = yaml.safe_load(cfg.read_text())
        data.setdefault("run", {})["dir"] = str(Path(given).resolve())
        path = Path(tempfile.mkdtemp(prefix="bench-compress-")) / "c.yaml"
        path.write_text(yaml.safe_dump(data))
        return path, f"{given} (as trained)"
    d = yaml.safe_load((HERE.parent / "configs" / "quickstart.yaml").read_text())
    tmp = Path(tempfile.mkdtemp(prefix="bench-compress-"))
    d["run"]["dir"] = str(tmp / "run")
    d["data"]["max_bytes"] = 2_000_000
    d["train"].update(max_steps=TRAIN_STEPS, warmup_steps=30, eval_every=100000, save_every=100000, max_time="6m")
    d["eval"] = {"compare_init": False}
    path = tmp / "c.yaml"
    path.write_text(yaml.safe_dump(d))
    _cli("run", str(path), "--to", "train", "-q")
    return path, f"quickstart architecture, {TRAIN_STEPS} steps on 2 MB of the builtin corpus"


def decode_race(path: str, methods: list[str], rounds: int = ROUNDS) -> dict:
    """Best single-stream greedy decode tokens/s per method, sides alternating each round."""
    import torch

    from llmctl.compression_report import decode_tokens_per_s
    from llmctl.modeling import load_for_inference

    models = {}
    for m in methods:
        try:
            models[m] = load_for_inference(path, device=torch.device("cpu"), quantize=None if m == "f32" else m)
        except Exception as e:  # int4 without torchao: reported, not fatal
            print(f"[compress] {m}: cannot load ({type(e).__name__}: {e})", flush=True)
    best = {m: 0.0 for m in models}
    for _ in range(rounds):
        for m, (model, tok) in models.items():
            best[m] = max(best[m], decode_tokens_per_s(model, tok, NEW, reps=1) or 0.0)
    return best


def llama_cpp_decode(files: dict[str, Path], rounds: int = 3) -> dict:
    """Decode tokens/s of each GGUF file in llama.cpp itself (llama-server's own timings of a
    greedy NEW-token completion, EOS ignored, best of `rounds`); {} when llama-server is absent."""
    import socket
    import urllib.request

    from llmctl.exporters import gguf as gguf_x

    binary = gguf_x.llama_cpp("llama-server")
    if binary is None:
        return {}
    out = {}
    for name, path in files.items():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = subprocess.Popen([str(binary), "-m", str(path), "--host", "127.0.0.1", "--port", str(port), "-np", "1", "--no-webui"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(600):
                try:
                    if json.loads(urllib.request.urlopen(url + "/health", timeout=1).read()).get("status") == "ok":
                        break
                except Exception:
                    if proc.poll() is not None:
                        raise RuntimeError(f"llama-server exited with {proc.returncode}") from None
                    time.sleep(0.1)
            body = json.dumps({"prompt": "def read_config(path):", "n_predict": NEW, "temperature": 0, "ignore_eos": True}).encode()
            best = 0.0
            for _ in range(rounds):
                req = urllib.request.Request(url + "/completion", data=body, headers={"Content-Type": "application/json"})
                res = json.loads(urllib.request.urlopen(req, timeout=120).read())
                best = max(best, float(res["timings"]["predicted_per_second"]))
            out[name] = round(best, 1)
        except Exception as e:
            print(f"[compress] llama.cpp decode of {path.name}: {type(e).__name__}: {e}", flush=True)
        finally:
            proc.terminate()
            proc.wait(30)
    return out


def linear_race(model_dirs: list[str], calls: int = 2000, rounds: int = 5) -> dict:
    """Why int8 decode is or is not faster: microseconds per call of one Linear at one token
    (M = 1), f32 against what `--quantize int8` puts in its place (torch's dynamic int8
    Linear), for every distinct Linear shape of these models; alternating, best of `rounds`."""
    import torch
    from transformers import AutoConfig

    torch.set_num_threads(1)  # the engine's thread count on this machine
    shapes = set()
    for d in model_dirs:
        c = AutoConfig.from_pretrained(d)
        h, i, v = c.hidden_size, c.intermediate_size, c.vocab_size
        shapes |= {(h, h), (h, i), (i, h), (h, v)}
    out = {}
    for fin, fout in sorted(shapes):
        lin = torch.nn.Linear(fin, fout, bias=False)
        q = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig},
                                                   dtype=torch.qint8)[0]  # as llmctl/quantize.py does
        x = torch.randn(1, fin)
        best = {"f32": float("inf"), "int8": float("inf")}
        with torch.inference_mode():
            for _ in range(rounds):
                for name, mod in (("f32", lin), ("int8", q)):
                    for _ in range(50):
                        mod(x)
                    t0 = time.perf_counter()
                    for _ in range(calls):
                        mod(x)
                    best[name] = min(best[name], (time.perf_counter() - t0) / calls * 1e6)
        out[f"{fin}x{fout}"] = {"f32_us": round(best["f32"], 1), "int8_us": round(best["int8"], 1),
                                "int8_speedup": round(best["f32"] / best["int8"], 2)}
    return out


def scale_model(out: Path) -> str:
    from _model import quickstart_model

    return str(quickstart_model(out, hidden=SCALE["hidden"], layers=SCALE["layers"]))


def main() -> None:
    import torch

    from llmctl.config import load_config
    from llmctl import compression_report as report_x
    from llmctl.modeling import load_for_inference
    from llmctl.rundir import RunDir

    t0 = time.time()
    path, what = trained_run()
    cfg = load_config(path)
    rd = RunDir(cfg.run.dir)
    from typing import get_args

    gguf_types = list(get_args(get_args(type(cfg.export).model_fields["gguf_types"].annotation)[0]))  # every type llmctl writes
    _cli("export", str(path), "--force", "-q", "-f", "hf-int8", "-f", "gguf",
         "--set", f"export.gguf_types=[{','.join(gguf_types)}]", "--set", "export.report=true",
         "--set", "export.report_decode_tokens=0", "--set", "export.report_max_tokens=16384")
    rep = json.loads((rd.stage_dir("export") / "manifest.json").read_text())["report"]
    rows = {r["name"]: r for r in rep["rows"]}
    model_dir = str(rd.model_dir)

    # int4 perplexity (the report has int8's): same tokens, same window
    from transformers import AutoTokenizer

    from llmctl import heldout

    tok = AutoTokenizer.from_pretrained(model_dir)
    held = heldout.load(cfg, rd, tok, max_tokens=16384)
    try:
        m4, _ = load_for_inference(model_dir, device=torch.device("cpu"), quantize="int4")
        p4 = heldout.perplexity(m4, tok, held, cfg)["perplexity"]
        del m4
    except Exception as e:
        print(f"[compress] int4 perplexity: {type(e).__name__}: {e}", flush=True)
        p4 = None
    f32_ppl = rows["f32 (train/model)"]["perplexity"]

    speed = decode_race(model_dir, ["f32", "int8", "int4"])
    big_dir = scale_model(Path(tempfile.mkdtemp(prefix="bench-compress-big-")) / "m")
    big = decode_race(big_dir, ["f32", "int8", "int4"], rounds=3)
    linears = linear_race([model_dir, big_dir])

    types = {}
    for r in rep["rows"]:
        types[r["name"]] = {k: r.get(k) for k in ("size_bytes", "size_ratio", "perplexity", "ppl_delta_pct", "error") if r.get(k) is not None}
    types["f32 --quantize int4"] = {"perplexity": round(p4, 4) if p4 else None, "ppl_delta_pct": round(100 * (p4 / f32_ppl - 1), 3) if p4 else None}
    for m in ("int8", "int4"):
        if m in speed:
            types[f"f32 --quantize {m}"]["decode_tokens_per_s"] = round(speed[m], 1)
    types["f32 (train/model)"]["decode_tokens_per_s"] = round(speed["f32"], 1)
    gguf_dir = rd.stage_dir("export") / "gguf"
    cpp = llama_cpp_decode({f"gguf {t}": gguf_dir / f"model-{t}.gguf" for t in gguf_types if (gguf_dir / f"model-{t}.gguf").is_file()})
    for name, tps in cpp.items():
        types.setdefault(name, {})["llama_cpp_decode_tokens_per_s"] = tps
    n_params = sum(p.numel() for p in load_for_inference(model_dir, device=torch.device("cpu"))[0].parameters())
    metrics = {
        "model": what, "params": n_params, "f32_perplexity": f32_ppl,
        "perplexity_tokens": rep["perplexity_tokens"], "decode_new_tokens": NEW, "rounds": ROUNDS,
        "machine": machine(),
        "types": types,
        "int8_decode_speedup": round(speed["int8"] / speed["f32"], 3),
        "int4_decode_speedup": round(speed["int4"] / speed["f32"], 3) if "int4" in speed else None,
        "scale_model": f"random llama hidden {SCALE['hidden']}, {SCALE['layers']} layers",
        "scale_decode_tokens_per_s": {k: round(v, 1) for k, v in big.items()},
        "scale_int8_decode_speedup": round(big["int8"] / big["f32"], 3),
        "int8_linear_one_token": linears,  # per Linear shape (in x out): f32 vs dynamic int8, one call at M = 1
        "seconds": round(time.time() - t0, 1),
        "export_report": rep,  # what `llmctl export` printed: README quotes it (bench/passages.py)
    }
    int8_delta = abs(rows["f32 --quantize int8"]["ppl_delta_pct"])
    q8 = rows.get("gguf q8_0", {})
    write_result("compress", metrics, model_params=n_params, ratios={
        "compress --quantize int8 decode vs f32": ratio(speed["int8"] / speed["f32"], 1.5),
        "compress --quantize int8 |delta ppl| %": ratio(int8_delta, 1.0, higher_is_better=False),
        "compress gguf q8_0 |delta ppl| %": ratio(abs(q8.get("ppl_delta_pct", float("inf"))), 1.0, higher_is_better=False),
    })
    print()
    for line in report_x.table(rep):
        print(line)


REAL_PPL_TOKENS = int(os.environ.get("LLMCTL_BENCH_COMPRESS_TOKENS", 4096))
REAL_GGUF = ["f32", "q8_0", "q4_0"]


def llama_cpp_perplexity(gguf: Path, text: str, ctx: int) -> float | None:
    """llama.cpp's `llama-perplexity` on `text` (it scores the second half of each ctx-token chunk);
    None without the binary."""
    import re

    from llmctl.exporters import gguf as gguf_x

    binary = gguf_x.llama_cpp("llama-perplexity")
    if binary is None:
        return None
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as fh:
        fh.write(text)
    r = subprocess.run([str(binary), "-m", str(gguf), "-f", fh.name, "-c", str(ctx), "-b", str(ctx), "-t", str(os.cpu_count() or 1), "--no-warmup"],
                       capture_output=True, text=True, timeout=1800)
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", r.stdout + r.stderr)
    if r.returncode != 0 or not m:
        print(f"[compress] llama-perplexity on {gguf.name} failed ({r.returncode}): {(r.stderr or r.stdout)[-500:]}", flush=True)
        return None
    return float(m.group(1))


def real_main(size: str) -> None:
    """The 85M (trained) bench model: int8 and GGUF perplexity deltas, ours and llama.cpp's."""
    from transformers import AutoTokenizer

    from _model import params_of, real_info, real_model
    from llmctl import compression_report as report_x, heldout
    from llmctl.config import load_config
    from llmctl.rundir import RunDir

    t0 = time.time()
    model_dir = real_model(size)
    info = real_info(size)
    path = Path(info["config"])
    cfg = load_config(path)
    rd = RunDir(cfg.run.dir)
    t_exp = time.time()
    _cli("export", str(path), "--force", "-q", "-f", "gguf", "--set", f"export.gguf_types=[{','.join(REAL_GGUF)}]", "--set", "export.report=true",
         "--set", "export.report_decode_tokens=0", "--set", f"export.report_max_tokens={REAL_PPL_TOKENS}")
    export_s = round(time.time() - t_exp, 1)
    rep = json.loads((rd.stage_dir("export") / "manifest.json").read_text())["report"]
    rows = {r["name"]: r for r in rep["rows"]}

    # llama.cpp's own perplexity on the same held-out tokens, as text
    tok = AutoTokenizer.from_pretrained(model_dir)
    held = heldout.load(cfg, rd, tok, max_tokens=REAL_PPL_TOKENS)
    text = "".join(tok.decode(d, skip_special_tokens=True) for d in held.docs)
    ctx = cfg.eval.max_length or cfg.data.block_size
    gguf_dir = rd.stage_dir("export") / "gguf"
    cpp_ppl = {t: llama_cpp_perplexity(gguf_dir / f"model-{t}.gguf", text, ctx) for t in REAL_GGUF}
    cpp_delta = {t: round(100 * (cpp_ppl[t] / cpp_ppl["f32"] - 1), 3) for t in REAL_GGUF if cpp_ppl.get(t) and cpp_ppl.get("f32")}

    speed = decode_race(str(model_dir), ["f32", "int8"], rounds=3)
    cpp_speed = llama_cpp_decode({f"gguf {t}": gguf_dir / f"model-{t}.gguf" for t in REAL_GGUF})
    types = {r["name"]: {k: r.get(k) for k in ("size_bytes", "size_ratio", "perplexity", "ppl_delta_pct", "error") if r.get(k) is not None}
             for r in rep["rows"]}
    for t in REAL_GGUF:
        row = types.setdefault(f"gguf {t}", {})
        row.update(llama_cpp_perplexity=cpp_ppl.get(t), llama_cpp_ppl_delta_pct=cpp_delta.get(t),
                   llama_cpp_decode_tokens_per_s=cpp_speed.get(f"gguf {t}"))
    types["f32 (train/model)"]["decode_tokens_per_s"] = round(speed["f32"], 1)
    types["f32 --quantize int8"]["decode_tokens_per_s"] = round(speed["int8"], 1)
    n_params = params_of(model_dir)
    metrics = {
        "model": f"bench/_model.py real_model({size!r}): 12 x 768, GQA 12/4, MLP 2048, {info['vocab_size']}-token BPE, trained by llmctl",
        "model_params": n_params, "training": info.get("train"), "training_seconds": info.get("train_seconds"),
        "f32_perplexity": rows["f32 (train/model)"].get("perplexity"), "perplexity_tokens": rep["perplexity_tokens"],
        "llama_cpp_perplexity_ctx": ctx, "llama_cpp_perplexity_note": f"llama-perplexity -c {ctx}: the second half of each {ctx}-token chunk is scored, so its perplexity differs from ours; compare deltas",
        "decode_new_tokens": NEW, "machine": machine(), "uptime": os.popen("uptime").read().strip(), "types": types,
        "int8_decode_speedup": round(speed["int8"] / speed["f32"], 3), "export_seconds": export_s,
        "seconds": round(time.time() - t0, 1), "export_report": rep,
    }
    int8_delta = abs(rows["f32 --quantize int8"]["ppl_delta_pct"])
    ratios = {
        f"compress {size} --quantize int8 |delta ppl| %": ratio(int8_delta, 1.0, higher_is_better=False),
        f"compress {size} --quantize int8 decode vs f32": ratio(speed["int8"] / speed["f32"], 1.5),
    }
    for t in ("q8_0", "q4_0"):
        if t in cpp_delta:
            ratios[f"compress {size} gguf {t} |delta ppl| % in llama.cpp"] = ratio(abs(cpp_delta[t]), 1.0 if t == "q8_0" else None, higher_is_better=False)
        if rows.get(f"gguf {t}", {}).get("ppl_delta_pct") is not None:
            ratios[f"compress {size} gguf {t} |delta ppl| % (transformers' reader)"] = ratio(abs(rows[f"gguf {t}"]["ppl_delta_pct"]), 1.0 if t == "q8_0" else None,
                                                                                                 higher_is_better=False)
    write_result(f"compress-{size}", metrics, ratios, model_params=n_params)
    print()
    for line in report_x.table(rep):
        print(line)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=["toy", "85m"], default="toy", help="toy: the quickstart model trained briefly; 85m: bench/_model.py's trained 85M model")
    size = ap.parse_args().size
    main() if size == "toy" else real_main(size)
