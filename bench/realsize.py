"""Speed at the realistic size (issue #26): an 85M-parameter llama (12 layers, hidden 768, GQA 12/4,
intermediate 2048, a 16k BPE trained on the standard library's source, f32, random weights:
speed does not depend on what the weights learned), side by side, alternating rounds in one run.

generate (in-process, one stream, greedy, NEW tokens, the same thread count on every side):
  llmctl's `generate_batch` (the lean path where it covers the model) and its llama.cpp path
  (`generate.engine: llama.cpp`, on the f32 GGUF of the same weights) vs transformers'
  `model.generate` with its default dynamic cache and with its static cache.
serve (the real `llmctl serve`, closed-loop clients, MAX_TOKENS new tokens per request):
  f32: llmctl serve (torch engine), llmctl serve with serve.engine llama.cpp, bare llama-server
  on the same f32 GGUF; int8: llmctl serve --quantize int8 (torch engine), the llama.cpp engine
  on q8_0, bare llama-server on the same q8_0 GGUF. At 1, 4 and 8 clients.

Every row records `model_params`, and the machine's load average at its start and end (the
numbers are provisional on a busy machine). Targets (#26): serve 1 client >= 0.8x llama-server,
4 and 8 clients >= 1.0x, for f32 and for int8 vs q8_0; generate >= 2x transformers' generate.

    .venv/bin/python bench/realsize.py                  # both; writes bench/results/realsize.json
    .venv/bin/python bench/realsize.py --only generate  # or --only serve (the other part's rows kept); --rounds N
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from _model import _stdlib_text
from common import machine, ratio, write_result

NEW = 32
MAX_TOKENS = 32
CACHE = Path(os.environ.get("LLMCTL_BENCH_CACHE", Path.home() / ".cache" / "llmctl-bench")) / "speed-85m"
CLIENTS = ((1, 8), (4, 32), (8, 64))  # (concurrent clients, requests per phase: 8 waves at 8 clients, ~7 s at 85M f32)
THREADS = os.cpu_count() or 1  # the model's CPU threads on every side (llama-server's default: the cores)


def load() -> float:
    return round(os.getloadavg()[0], 2)


def model_85m(out: Path = CACHE / "model") -> Path:
    """The 85M llama with a 16k byte-level BPE, saved once (reused across runs)."""
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from conftest import train_tiny_tokenizer

    tmp = out.with_name(out.name + ".tmp")
    tok = train_tiny_tokenizer(_stdlib_text(6_000_000), tmp, vocab_size=16384)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                      num_key_value_heads=4, max_position_embeddings=1024, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(tmp)
    GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id).save_pretrained(tmp)
    tmp.rename(out)
    return out


def params_of(model) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- generate
def generate_rows(model_dir: Path, rounds: int, threads: int) -> dict:
    """One stream, greedy, NEW tokens (EOS off: every side makes them all), sides alternating."""
    import torch

    from llmctl.generation import Sampling, generate_batch
    from llmctl.modeling import load_for_inference

    torch.set_num_threads(threads)  # every side the same (`llmctl generate` leaves torch's default: all cores)
    model, tok = load_for_inference(str(model_dir))
    model.generation_config.eos_token_id = None
    n_params = params_of(model)
    prompt = "def read_config(path):\n    "
    enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
    sp = Sampling(max_new_tokens=NEW)

    def hf(**kw):
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=NEW, do_sample=False, pad_token_id=tok.pad_token_id, **kw)
        return out.shape[1] - enc["input_ids"].shape[1]

    # The ceiling of any torch decode at this precision and thread count: each token reads every
    # Linear's weight once (F.linear at M=1), and does nothing else.
    weights = [m.weight.detach() for m in model.modules() if isinstance(m, torch.nn.Linear)]
    xs = {w.shape[1]: torch.randn(1, w.shape[1]) for w in weights}

    def matmuls_only(linear=torch.nn.functional.linear):
        with torch.inference_mode():
            for _ in range(NEW):
                for w in weights:
                    linear(xs[w.shape[1]], w)
        return NEW

    from llmctl.inference.lean import ONEDNN_LINEAR

    # `llmctl generate --set generate.engine=llama.cpp`: the same call on a llama-server it runs on
    # the f32 GGUF of these weights (checked against the model first), with the same threads.
    server = None
    from llmctl.inference.llamacpp import LlamaServer, disagreement, find_binary

    if find_binary("llama-server") is not None:
        from llmctl.inference.llamacpp_generate import generate_llamacpp

        server = LlamaServer(_ggufs(model_dir, Path(tempfile.mkdtemp(prefix="bench-realsize-")))["f32"], 1, 1024, threads=threads)
        server.start()
        why = disagreement(server, model, tok, "f32")
        assert why is None, why
    sides = {
        "llmctl": lambda: generate_batch(model, tok, [prompt], sp)[0]["completion_tokens"],
        **({"llmctl_llama_cpp": lambda: generate_llamacpp(server, tok, [prompt], sp, set(), 1024)[0]["completion_tokens"]} if server else {}),
        "hf_generate": hf,
        "hf_generate_static_cache": lambda: hf(cache_implementation="static"),
        "torch_matmuls_only": matmuls_only,
        **({"onednn_matmuls_only": lambda: matmuls_only(ONEDNN_LINEAR)} if ONEDNN_LINEAR is not None else {}),
    }
    for fn in sides.values():  # warm-up (the lean decoder's build, the static cache's allocation)
        fn()
    runs: dict[str, list[float]] = {k: [] for k in sides}
    loads = [load()]
    for r in range(rounds):
        for name, fn in (sides.items() if r % 2 == 0 else reversed(sides.items())):
            t0 = time.perf_counter()
            n = fn()
            assert n == NEW, (name, n)
            runs[name].append(n / (time.perf_counter() - t0))
        loads.append(load())
    if server is not None:
        server.stop()
    per_round = [{k: v[i] for k, v in runs.items()} for i in range(rounds)]
    return {"model_params": n_params, "threads": threads, "new_tokens": NEW, "rounds": rounds, "load_avg_1m": loads,
            **{f"{k}_tokens_per_s": round(statistics.median(v), 1) for k, v in runs.items()},
            "llmctl_vs_hf_generate": round(statistics.median(x["llmctl"] / x["hf_generate"] for x in per_round), 3),
            **({"llmctl_llama_cpp_vs_hf_generate": round(statistics.median(x["llmctl_llama_cpp"] / x["hf_generate"] for x in per_round), 3)}
               if "llmctl_llama_cpp" in runs else {}),
            "llmctl_vs_hf_static_cache": round(statistics.median(x["llmctl"] / x["hf_generate_static_cache"] for x in per_round), 3),
            "ceiling_vs_hf_generate": round(statistics.median(x["torch_matmuls_only"] / x["hf_generate"] for x in per_round), 3),
            **({"onednn_ceiling_vs_hf_generate": round(statistics.median(x["onednn_matmuls_only"] / x["hf_generate"] for x in per_round), 3)}
               if "onednn_matmuls_only" in runs else {}),
            "lean_path": _lean_state(model),
            "runs": {k: [round(x, 1) for x in v] for k, v in runs.items()}}


def _lean_state(model) -> str:
    from llmctl.inference.lean import decoder_for

    dec = decoder_for(model)
    if dec is None:
        return "off (transformers decodes)"
    fold = "folded" if dec.fast is not None else f"unfolded ({dec.fast_skipped})"
    return f"{fold} + onnxruntime" if dec.ort is not None else f"{fold}, eager ({dec.ort_skipped})"


# --------------------------------------------------------------------------- serve
def _llmctl_serve(model_dir: Path, tmp: Path, name: str, env: dict | None = None, **serve) -> tuple[subprocess.Popen, str]:
    """`llmctl serve` on `model_dir` with these serve settings (and environment variables), started."""
    from serve import start

    cfg = tmp / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump({"run": {"name": "bench", "dir": str(tmp / f"run-{name}")},
                                   "serve": {"model": str(model_dir), "max_batch_size": 8, "max_queue": 256, "threads": THREADS, **serve}}))
    return start([sys.executable, "-m", "llmctl", "serve", str(cfg), "--port", "0"],
                 lambda line: (m.group(1) if (m := re.search(r" on (http://[\d.]+:\d+)/v1", line)) else None),
                 env={**os.environ, **env} if env else None)


def _bare_llama_server(binary: Path, gguf: Path, ctx: int) -> tuple[subprocess.Popen, str]:
    from serve import start

    from llmctl.inference.llamacpp import _free_port

    port = _free_port()
    cmd = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-np", "8", "-c", str(8 * ctx), "--no-webui",
           "-t", str(THREADS), "--metrics"]  # its counters, as the engine's llama-server keeps them
    return start(cmd, lambda line: f"http://127.0.0.1:{port}" if "listening" in line else None)


def _ggufs(model_dir: Path, tmp: Path) -> dict[str, Path]:
    """f32 and q8_0 GGUFs of the same weights, written by llmctl's exporter (cached beside the model)."""
    from llmctl.exporters import gguf as gguf_x
    from llmctl.modeling import load_for_inference

    out = CACHE / "gguf"
    want = {q: out / f"model-{q}.gguf" for q in ("f32", "q8_0")}
    if not all(p.is_file() for p in want.values()):
        model, tok = load_for_inference(str(model_dir))
        part = tmp / "gguf"
        part.mkdir(exist_ok=True)
        for q in want:
            gguf_x.write(model, tok, part, q, "bench")
        out.mkdir(parents=True, exist_ok=True)
        for q, p in want.items():
            (part / p.name).rename(p)
    return want


def _stop(proc) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def serve_rows(model_dir: Path, rounds: int) -> dict:
    """Per precision: llmctl serve (torch), llmctl serve (llama.cpp engine), bare llama-server, at
    1/4/8 clients; per round and client count the three sides run back to back, in alternating order."""
    from serve import phases

    from llmctl.inference.llamacpp import find_binary

    binary = find_binary("llama-server")
    if binary is None:
        return {"skipped": "llama-server not found ($LLAMA_CPP_BIN, PATH, /opt/llamacpp/build/bin)"}
    tmp = Path(tempfile.mkdtemp(prefix="bench-realsize-"))
    ggufs = _ggufs(model_dir, tmp)
    out: dict = {"llama_server": str(binary)}
    for prec, quant, gguf in (("f32", "none", ggufs["f32"]), ("int8", "int8", ggufs["q8_0"])):
        procs = {}
        try:
            procs["llmctl_torch"] = _llmctl_serve(model_dir, tmp, f"torch-{prec}", quantize=quant)
            procs["llmctl_llama_cpp"] = _llmctl_serve(gguf, tmp, f"cpp-{prec}", engine="llama.cpp", quantize=quant)
            procs["llama_server"] = _bare_llama_server(binary, gguf, 1024)
            out[prec] = _side_by_side({k: u for k, (_, u) in procs.items()}, rounds, phases, front_door=procs["llmctl_llama_cpp"][0].pid)
            out[prec]["gguf"] = gguf.name
        finally:
            for p, _ in procs.values():
                _stop(p)
    return out


def cpu_seconds(pid: int) -> float:
    """CPU time of one process's own threads (not its children), from the scheduler's
    nanosecond counters (/proc/PID/task/*/schedstat); 0 where there is no /proc."""
    total = 0
    for d in Path(f"/proc/{pid}/task").glob("*"):
        try:
            total += int((d / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total / 1e9


def llama_counters(url: str) -> tuple[float, float] | None:
    """(llama_decode() calls, busy slots summed over them) from llama-server's counters on
    `url`/metrics (a bare llama-server, or llmctl serve with the llama.cpp engine, which serves
    its llama-server's after its own); None without them."""
    import httpx

    try:
        text = httpx.get(url + "/metrics", timeout=10).text
    except httpx.HTTPError:
        return None
    got = {k: re.search(rf"^llamacpp:{k} (\S+)$", text, re.M) for k in ("n_decode_total", "n_busy_slots_per_decode")}
    if not all(got.values()):
        return None
    n = float(got["n_decode_total"].group(1))
    return n, n * float(got["n_busy_slots_per_decode"].group(1))  # the gauge is the mean since start


def _side_by_side(urls: dict[str, str], rounds: int, phases, front_door: int | None = None) -> dict:
    """Per round and client count the sides back to back, in alternating order. `front_door`:
    the pid of `llmctl serve` with the llama.cpp engine, whose own CPU (its llama-server is a
    child, not counted) is the front door's cost: ms per request and the share of one core it
    took from the cores llama.cpp decodes on, per phase. For the sides that run llama-server,
    its decode calls and busy slots per call in each phase (the same work, or not: a count,
    which the machine's speed does not move)."""
    extra = {"llama_server": {"ignore_eos": True}}  # bare llama-server: every request makes MAX_TOKENS
    for name, url in urls.items():  # warm-up
        phases(url, "bench", extra.get(name, {}), [("warm", 1, 1, {})])
    per: dict[str, list[dict]] = {f"clients_{c}": [] for c, _ in CLIENTS}
    for r in range(rounds):
        for c, n in CLIENTS:
            row = {"load_avg_1m_start": load()}
            order = list(urls) if r % 2 == 0 else list(reversed(urls))
            for name in order:
                cpu0 = cpu_seconds(front_door) if front_door and name == "llmctl_llama_cpp" else None
                llama0 = llama_counters(urls[name]) if name in ("llmctl_llama_cpp", "llama_server") else None
                row[name] = phases(urls[name], "bench", extra.get(name, {}), [("p", c, n, {})])["p"]
                llama1 = llama_counters(urls[name]) if llama0 else None
                if llama1:
                    decodes = llama1[0] - llama0[0]
                    row[name]["llama_decodes"] = int(decodes)
                    row[name]["busy_slots_per_decode"] = round((llama1[1] - llama0[1]) / max(decodes, 1), 3)
                if cpu0 is not None:
                    used = cpu_seconds(front_door) - cpu0
                    row["front_door"] = {"cpu_ms_per_request": round(1000 * used / max(row[name]["requests"], 1), 2),
                                         "core_share": round(used / row[name]["seconds"], 4)}
            row["load_avg_1m_end"] = load()
            per[f"clients_{c}"].append(row)
            fd = f", front door {row['front_door']['cpu_ms_per_request']} ms CPU a request" if "front_door" in row else ""
            print(f"[realsize] round {r + 1}, {c} client(s): " + ", ".join(f"{k} {row[k]['tokens_per_s']} tok/s" for k in urls)
                  + f" (load {row['load_avg_1m_start']} -> {row['load_avg_1m_end']}{fd})", file=sys.stderr, flush=True)
    res = {}
    for key, rows in per.items():
        tps = {name: [x[name]["tokens_per_s"] for x in rows] for name in urls}
        res[key] = {
            **{f"{name}_tokens_per_s": round(statistics.median(v), 1) for name, v in tps.items()},
            "torch_vs_llama_server": round(statistics.median(a / b for a, b in zip(tps["llmctl_torch"], tps["llama_server"])), 3),
            "llama_cpp_engine_vs_llama_server": round(statistics.median(a / b for a, b in zip(tps["llmctl_llama_cpp"], tps["llama_server"])), 3),
            "errors": sum(x[name]["errors"] for x in rows for name in urls),
            **({f"{name}_{k}": statistics.median(x[name][k] for x in rows) for name in ("llmctl_llama_cpp", "llama_server")
                for k in ("llama_decodes", "busy_slots_per_decode")} if rows and all("llama_decodes" in rows[0].get(n, {}) for n in ("llmctl_llama_cpp", "llama_server")) else {}),
            **({"front_door_cpu_ms_per_request": statistics.median(x["front_door"]["cpu_ms_per_request"] for x in rows),
                "front_door_core_share": statistics.median(x["front_door"]["core_share"] for x in rows)} if rows and "front_door" in rows[0] else {}),
            "rounds": rows,
        }
    return res


def main() -> None:
    global THREADS, CLIENTS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=("generate", "serve"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="half the requests per phase, phases capped at 30 s (a busy machine)")
    ap.add_argument("--threads", type=int, default=THREADS, help="the model's CPU threads, every side (default: the cores)")
    args = ap.parse_args()
    THREADS = args.threads
    if args.quick:
        import serve

        CLIENTS = tuple((c, max(2, n // 2)) for c, n in CLIENTS)
        serve.PHASE_SECONDS = 30.0
    at_start = machine()
    model_dir = model_85m()
    metrics: dict = {"model": "llama 12 layers, hidden 768, GQA 12/4, intermediate 2048, 16k BPE, f32, random weights", "machine": at_start,
                     "threads": THREADS,
                     "note": "provisional where load_avg_1m is above the core count: rerun on a quiet machine"}
    ratios: dict = {}
    if args.only:  # one part measured: the other part's rows as bench/results.json has them
        import json

        kept = json.loads((Path(__file__).resolve().parent / "results.json").read_text()).get("realsize") or {}
        other = "serve" if args.only == "generate" else "generate"
        if other in (kept.get("metrics") or {}):
            km = kept["metrics"]
            metrics[other] = km[other]
            metrics[f"{other}_machine"] = km.get(f"{other}_machine") or km.get("machine")
            ratios.update({k: v for k, v in kept["ratios"].items() if (k.startswith("85M serve") == (other == "serve"))})
    if args.only in (None, "generate"):
        metrics["generate_machine"] = machine()
        g = metrics["generate"] = generate_rows(model_dir, args.rounds, THREADS)
        metrics["model_params"] = g["model_params"]
        ratios["85M generate one stream vs transformers generate"] = ratio(g["llmctl_vs_hf_generate"], 2.0)
        if "llmctl_llama_cpp_vs_hf_generate" in g:
            ratios["85M generate one stream vs transformers generate (engine llama.cpp)"] = ratio(g["llmctl_llama_cpp_vs_hf_generate"], 2.0)
        ratios["85M generate one stream vs transformers generate (static cache)"] = ratio(g["llmctl_vs_hf_static_cache"], None)
        # what no torch path at this precision can pass: the weights' matmuls alone
        ratios["85M torch matmuls alone (the ceiling) vs transformers generate"] = ratio(g["ceiling_vs_hf_generate"], None)
    if args.only in (None, "serve"):
        metrics["serve_machine"] = machine()
        s = metrics["serve"] = serve_rows(model_dir, args.rounds)
        for prec, ref in (("f32", "llama-server f32"), ("int8", "llama-server q8_0")):
            if prec not in s:
                continue
            for c, _ in CLIENTS:
                row = s[prec][f"clients_{c}"]
                target = 0.8 if c == 1 else 1.0
                what = "serve" if prec == "f32" else "serve --quantize int8"
                ratios[f"85M {what} {c} client(s) vs {ref} (torch engine)"] = ratio(row["torch_vs_llama_server"], target)
                ratios[f"85M {what} {c} client(s) vs {ref} (engine llama.cpp)"] = ratio(row["llama_cpp_engine_vs_llama_server"], target)
                if "llama_server_llama_decodes" in row:  # the same decode work behind the engine as bare (context: a count)
                    ratios[f"85M {what} {c} client(s): llama.cpp decode calls, engine llama.cpp / bare llama-server"] = ratio(
                        row["llmctl_llama_cpp_llama_decodes"] / max(row["llama_server_llama_decodes"], 1), None)
                if "front_door_core_share" in row:  # what the front door's CPU took from llama.cpp's cores (context)
                    ratios[f"85M {what} {c} client(s): llmctl front door's CPU, % of one core (engine llama.cpp)"] = ratio(100 * row["front_door_core_share"], None)
    metrics.setdefault("model_params", _count(model_dir))
    metrics["load_avg_1m_end"] = load()
    write_result("realsize", metrics, ratios)


def _count(model_dir: Path) -> int:
    """Parameters of the saved model, counted on the meta device (no weights loaded)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return params_of(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir)))


if __name__ == "__main__":
    main()
