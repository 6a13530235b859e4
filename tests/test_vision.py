"""Image-text models (data.format=image_text, issue #28): the synthetic shapes, prepare's image
checks, dedup and leakage, training (from scratch, frozen tower, LoRA, resume), eval against
the majority-caption baseline, generate --image, serve through the openai client, export, explain.

Tiny everywhere: 16x16 or 32x32 images, hidden sizes 32, a few steps."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from conftest import invoke_cli, run_cli, write_config

pytest.importorskip("PIL")


def vision_config(run_dir: Path, **sections) -> dict:
    base = {
        "run": {"name": "v", "dir": str(run_dir), "seed": 0},
        "data": {"source": "builtin", "format": "image_text", "block_size": 48, "validation_fraction": 0.1, "test_fraction": 0.15,
                 "image": {"builtin_images": 120}},
        "tokenizer": {"vocab_size": 300, "min_frequency": 1},
        "model": {"n_layers": 1, "n_heads": 2, "hidden_size": 32, "intermediate_size": 64, "context_length": 64,
                  "vision": {"image_size": 16, "patch_size": 8, "hidden_size": 32, "n_layers": 1, "n_heads": 2}},
        "train": {"max_steps": 4, "micro_batch_size": 8, "warmup_steps": 0, "eval_every": 2, "save_every": 2, "log_every": 1, "eval_batches": 2},
        "eval": {"batch_size": 8, "max_new_tokens": 12, "max_examples": 8},
        "generate": {"max_new_tokens": 8, "do_sample": False},
        "export": {"report": False},
    }
    for k, v in sections.items():
        base.setdefault(k, {}).update(v)
    return base


def image_rows(folder: Path, n: int = 24, seed: int = 0, size: int = 16) -> list[dict]:
    """n shape scenes saved as PNG files under folder/img, and their rows (paths relative to folder)."""
    from llmctl.vision import shapes

    (folder / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (rec, _) in enumerate(shapes.scenes(n, seed, size, 0.0)):
        (folder / "img" / f"{i}.png").write_bytes(rec["image"])
        rows.append({"image": f"img/{i}.png", "caption": rec["caption"]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def files_config(tmp_path: Path, rows: list[dict], **data) -> Path:
    data_file = write_jsonl(tmp_path / "data" / "rows.jsonl", rows)
    d = {"source": "files", "paths": [str(data_file)], "validation_fraction": 0.2, "test_fraction": 0.0, **data}
    return write_config(tmp_path / "cfg.yaml", vision_config(tmp_path / "run", data=d))


# --------------------------------------------------------------------------- the shapes
def test_shapes_are_seeded_and_hold_out_unseen_pairings():
    from llmctl.vision import shapes

    a = list(shapes.scenes(60, 3, 16, 0.2))
    b = list(shapes.scenes(60, 3, 16, 0.2))
    assert [r["image"] for r, _ in a] == [r["image"] for r, _ in b]
    held = shapes.held_out_pairings(3, 0.2)
    assert 0 < len(held) < len(shapes.pairings())
    words = {w for r, s in a if s == "seen" for w in r["caption"].split()}
    for rec, split in a:
        cap = rec["caption"]
        pairing = next(p for p in shapes.pairings() if cap.split()[1:3] in ([p[0][0], p[0][1]], [p[0][0], p[0][1] + "s"])
                       and cap.endswith(f"a {p[1][0]} {p[1][1]}"))
        assert (split == "test") == (pairing in held), cap
    assert {w for r, s in a if s == "test" for w in r["caption"].split()} <= words | set(shapes.COLORS) | set(shapes.SHAPES)


# --------------------------------------------------------------------------- prepare
def test_prepare_files_dedups_images_checks_leakage_and_reports(tmp_path):
    rows = image_rows(tmp_path / "data", n=30)
    # The same picture twice under another name (content hash), and a re-encoded copy (JPEG-free: a palette PNG, same pixels).
    shutil.copy(tmp_path / "data" / "img" / "0.png", tmp_path / "data" / "img" / "dup.png")
    rows.append({"image": "img/dup.png", "caption": "a copy"})
    from PIL import Image

    Image.open(tmp_path / "data" / "img" / "1.png").convert("RGB").save(tmp_path / "data" / "img" / "resave.png", optimize=True)
    rows.append({"image": "img/resave.png", "caption": rows[1]["caption"]})
    path = files_config(tmp_path, rows)
    r = invoke_cli("prepare", str(path), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["images"] == 30 and out["curated_out"] == 2
    report = json.loads((tmp_path / "run" / "prepare" / "report.json").read_text())
    assert report["dropped"] == {"exact_duplicate_image": 2}
    assert sum(report["images"].values()) == 30 and report["splits"]["train"]["sizes"]["width_max"] == 16
    assert report["splits"]["all (before the split)"] == {"documents_before": 32, "documents_after": 30, "steps": [
        {"step": "exact dedup (content hash)", "removed": 2}, {"step": "near dedup (pHash)", "removed": 0}]}
    r = invoke_cli("status", str(tmp_path / "run"))  # prints the report as it prints a text run's
    assert r.returncode == 0 and "exact dedup (content hash): 2 removed" in r.stderr, r.stderr
    from datasets import load_from_disk

    ds = load_from_disk(str(tmp_path / "run" / "prepare" / "dataset"))
    row = ds["train"][0]
    assert len(row["pixel_values"]) == 3 and len(row["pixel_values"][0]) == 16
    # Loss only on the answer: the labels are -100 up to the caption, then the caption and EOS.
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(tmp_path / "run" / "prepare" / "tokenizer")
    first = next(i for i, x in enumerate(row["labels"]) if x != -100)
    assert all(x == -100 for x in row["labels"][:first]) and row["labels"][first:] == row["input_ids"][first:]
    assert proc.tokenizer.decode(row["labels"][first:-1]).strip() in {r["caption"] for r in rows}
    assert row["input_ids"].count(proc.tokenizer.convert_tokens_to_ids("<image>")) == 4  # (16/8)^2 patches
    pairs = load_from_disk(str(tmp_path / "run" / "prepare" / "pairs"))["validation"]
    assert len(pairs) == 6 and pairs[0]["image"][:4] == b"\x89PNG"


def test_perceptual_dedup_drops_a_near_copy(tmp_path):
    from PIL import Image

    rows = image_rows(tmp_path / "data", n=20)
    img = Image.open(tmp_path / "data" / "img" / "3.png").convert("RGB")
    img.putpixel((0, 0), (250, 250, 250))  # one background pixel a shade lighter: other bytes, same picture to the eye
    img.save(tmp_path / "data" / "img" / "near.png")
    rows.append({"image": "img/near.png", "caption": rows[3]["caption"]})
    for perceptual, dropped in ((True, {"near_duplicate_image": 1}), (False, {})):
        path = files_config(tmp_path, rows, image={"perceptual_dedup": perceptual, "phash_distance": 2})
        r = invoke_cli("prepare", str(path), "--force")
        assert r.returncode == 0, r.stderr
        assert json.loads((tmp_path / "run" / "prepare" / "report.json").read_text())["dropped"] == dropped


def test_leakage_drops_a_held_out_image_seen_in_training(tmp_path):
    rows = image_rows(tmp_path / "data", n=20)
    val = [dict(rows[0], caption="the same picture, held out"), rows[5]]
    write_jsonl(tmp_path / "data" / "val.jsonl", val)
    path = files_config(tmp_path, rows[:5] + rows[6:], validation_paths=[str(tmp_path / "data" / "val.jsonl")])
    r = invoke_cli("prepare", str(path), "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "run" / "prepare" / "report.json").read_text())
    assert report["dropped"] == {"validation_exact_leak": 1} and report["images"]["validation"] == 1


def _bad_cases(folder: Path) -> dict[str, tuple[dict, str]]:
    """name -> (row, what the error says)."""
    good = (folder / "img" / "0.png").read_bytes()
    (folder / "img" / "corrupt.png").write_bytes(b"not an image at all")
    (folder / "img" / "truncated.png").write_bytes(good[: len(good) // 2])
    (folder / "img" / "empty.png").write_bytes(b"")
    from PIL import Image

    Image.new("RGB", (300, 300), (1, 2, 3)).save(folder / "img" / "huge.png")
    return {
        "missing": ({"image": "img/nope.png", "caption": "x"}, "does not exist"),
        "corrupt": ({"image": "img/corrupt.png", "caption": "x"}, "not a readable image"),
        "truncated": ({"image": "img/truncated.png", "caption": "x"}, "truncated"),
        "empty": ({"image": "img/empty.png", "caption": "x"}, "empty"),
        "oversized": ({"image": "img/huge.png", "caption": "x"}, "max_pixels"),
        "no caption": ({"image": "img/0.png"}, "no field 'caption'"),
    }


def test_bad_images_name_file_and_line_and_exit_2_or_are_skipped(tmp_path):
    rows = image_rows(tmp_path / "data", n=12)
    cases = _bad_cases(tmp_path / "data")
    for name, (bad, says) in cases.items():
        path = files_config(tmp_path, rows[:3] + [bad] + rows[3:], image={"max_pixels": 10_000})
        r = invoke_cli("prepare", str(path), "--force")
        assert r.returncode == 2, (name, r.stderr)
        assert "rows.jsonl:4:" in r.stderr and says in r.stderr and "Traceback" not in r.stderr, (name, r.stderr)
        assert "on_error: skip" in r.stderr or name == "no caption", r.stderr
    # A file too large in bytes, and every bad row skipped and counted.
    path = files_config(tmp_path, rows[:3] + [c[0] for c in cases.values()] + rows[3:], image={"max_pixels": 10_000}, on_error="skip")
    r = invoke_cli("prepare", str(path), "--force", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["skipped_records"] == len(cases) and out["images"] == 12
    path = files_config(tmp_path, rows, image={"max_bytes": 50})
    r = invoke_cli("prepare", str(path), "--force")
    assert r.returncode == 2 and "rows.jsonl:1:" in r.stderr and "max_bytes=50" in r.stderr


# --------------------------------------------------------------------------- train
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(config path, run dir): the builtin shapes prepared and a tiny model trained 4 steps (shared, read-only)."""
    tmp = tmp_path_factory.mktemp("vision")
    path = write_config(tmp / "cfg.yaml", vision_config(tmp / "run", eval={"compare_init": True}))
    for stage in ("prepare", "train"):
        r = invoke_cli(stage, str(path))
        assert r.returncode == 0, r.stderr
    return path, tmp / "run"


def test_train_from_scratch_saves_a_model_that_loads_with_the_auto_classes(trained):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from llmctl.rundir import RunDir
    from llmctl.vision.shapes import draw_scene

    path, run = trained
    rd = RunDir(run)
    head = rd.manifest("train")["headline"]
    assert head["steps"] == 4 and head["val_loss"] < head["init_val_loss"]
    model = AutoModelForImageTextToText.from_pretrained(rd.model_dir)
    proc = AutoProcessor.from_pretrained(rd.model_dir)
    assert model.config.model_type == "llava" and model.config.vision_config.image_size == 16
    img = draw_scene(1, ("red", "circle"), "above", ("blue", "square"), 16, random.Random(0))
    enc = proc(images=[img], text=["<image>Describe the image.\n"], return_tensors="pt")
    with torch.no_grad():
        assert model(**enc).logits.shape[1] == enc["input_ids"].shape[1]
    assert sorted(p.name for p in rd.checkpoints_dir.iterdir()) == ["step-000002", "step-000004"]


def test_freeze_vision_trains_the_projector_only_beside_the_language_model(tmp_path):
    path = write_config(tmp_path / "cfg.yaml", vision_config(tmp_path / "run", model={"freeze": ["vision"]}, train={"lr": 1e-2}))
    assert invoke_cli("prepare", str(path)).returncode == 0
    from llmctl.config import load_config
    from llmctl.rundir import RunDir
    from llmctl.vision.infer import load_processor
    from llmctl.vision.model import build

    cfg = load_config(path)
    init = {k: v.detach().clone() for k, v in build(cfg, load_processor(RunDir(tmp_path / "run").tokenizer_dir).tokenizer).state_dict().items()}
    r = invoke_cli("train", str(path), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["trainable_parameters"] < out["parameters"]
    from transformers import AutoModelForImageTextToText

    trained = AutoModelForImageTextToText.from_pretrained(tmp_path / "run" / "train" / "model").state_dict()
    changed = {k.split(".")[1] for k, v in trained.items() if k in init and not (init[k] == v).all()}
    assert "vision_tower" not in changed and {"multi_modal_projector", "language_model"} <= changed, changed


def test_lora_trains_and_merges(tmp_path):
    pytest.importorskip("peft")
    path = write_config(tmp_path / "cfg.yaml", vision_config(tmp_path / "run", model={"lora": {"enabled": True, "r": 4, "target_modules": ["q_proj", "v_proj"]}}))
    assert invoke_cli("prepare", str(path)).returncode == 0
    r = invoke_cli("train", str(path), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["trainable_parameters"] < out["parameters"] / 4
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "run" / "train" / "model")
    AutoProcessor.from_pretrained(tmp_path / "run" / "train" / "model")
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert (tmp_path / "run" / "train" / "adapter").is_dir()


def _losses(run: Path) -> dict[int, float]:
    out = {}
    for line in (run / "train" / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


def _killed_and_resumed(tmp_path, config_of, kill_after: int) -> tuple[dict, dict]:
    """Runs a (uninterrupted) and b (SIGKILLed after the step-`kill_after` checkpoint, then resumed)
    of the config `config_of(name)` gives: their losses per step."""
    runs = {}
    for name in ("a", "b"):
        runs[name] = write_config(tmp_path / f"{name}.yaml", config_of(name))
        assert invoke_cli("prepare", str(runs[name])).returncode == 0
    assert invoke_cli("train", str(runs["a"])).returncode == 0
    r = run_cli("train", str(runs["b"]), env={"LLMCTL_FAULT_KILL_AFTER_SAVE": str(kill_after)})
    assert r.returncode == -9, r.stderr
    r = invoke_cli("train", str(runs["b"]))
    assert r.returncode == 0 and "resuming from" in r.stderr, r.stderr
    return _losses(tmp_path / "a"), _losses(tmp_path / "b")


def test_resume_after_sigkill_matches_the_uninterrupted_run(tmp_path):
    over = {"train": {"max_steps": 6, "save_every": 3, "eval_every": 100, "log_every": 1, "lr": 1e-2}}
    full, resumed = _killed_and_resumed(tmp_path, lambda name: vision_config(tmp_path / name, **over), 3)
    assert sorted(resumed) == list(range(1, 7))
    for step in (4, 5, 6):
        assert abs(resumed[step] - full[step]) < 1e-4, (step, resumed[step], full[step])


# --------------------------------------------------------------------------- generate
def test_generate_with_images_pairs_prompts_and_reads_jsonl_image_parts(trained, tmp_path):
    from llmctl.vision.shapes import draw_scene

    path, run = trained
    img = tmp_path / "scene.png"
    draw_scene(2, ("red", "circle"), "left of", ("blue", "square"), 16, random.Random(1)).save(img)
    r = invoke_cli("generate", str(path), "--image", str(img), "--image", str(img), "-p", "Describe the image.", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["outputs"] == 2 and all(rec["image"] == str(img) for rec in out["results"])
    assert out["results"][0]["output"] == out["results"][1]["output"]  # greedy: same image, same caption
    assert out["results"][0]["prompt_tokens"] > 4  # the image's patch tokens are in the prompt
    # A prompts file: {prompt, image} rows and chat rows with an image part, paths relative to the file.
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "Describe the image.", "image": "scene.png"}) + "\n"
                                      + json.dumps({"messages": [{"role": "user", "content": [{"type": "image", "path": "scene.png"},
                                                                                             {"type": "text", "text": "Describe the image."}]}]}) + "\n")
    r = invoke_cli("generate", str(path), "--prompts-file", str(tmp_path / "p.jsonl"), "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)["results"]
    assert [x["output"] for x in res] == [out["results"][0]["output"]] * 2
    # A bad image: one line naming it, exit 2.
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    r = invoke_cli("generate", str(path), "--image", str(tmp_path / "bad.png"))
    assert r.returncode == 2 and "--image" in r.stderr and "bad.png" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = invoke_cli("generate", str(path), "--image", str(tmp_path / "missing.png"))
    assert r.returncode == 2 and "does not exist" in r.stderr


# --------------------------------------------------------------------------- serve
def _data_uri(img) -> str:
    import base64
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_serve_takes_data_uri_images_through_the_openai_client(trained, tmp_path):
    openai = pytest.importorskip("openai")
    from PIL import Image

    from llmctl.vision.shapes import draw_scene
    from test_serve import Server

    path, run = trained
    img_path = tmp_path / "scene.png"
    img = draw_scene(2, ("red", "circle"), "left of", ("blue", "square"), 16, random.Random(1))
    img.save(img_path)
    r = invoke_cli("generate", str(path), "--image", str(img_path), "--json")
    assert r.returncode == 0, r.stderr
    expected = json.loads(r.stdout)["results"][0]["output"]
    cfg = vision_config(run, serve={"max_image_bytes": 3000}, safety={"deny": {"words": ["forbidden"]}})
    srv = Server(write_config(tmp_path / "serve.yaml", cfg))
    try:
        client = srv.client()

        def ask(*urls, text="Describe the image.", **kw):
            parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls] + [{"type": "text", "text": text}]
            return client.chat.completions.create(model="v", messages=[{"role": "user", "content": parts}], temperature=0, max_tokens=8, **kw)

        out = ask(_data_uri(img), logprobs=True)
        assert out.choices[0].message.content == expected  # the same sampler and prompt rule as generate --image
        # The image reached the model: the first token's logprob is the one computed with its pixels, not without.
        import torch

        from llmctl.vision.infer import batch_inputs, load_model

        model, proc = load_model(run / "train" / "model", "cpu")
        enc = batch_inputs(proc, ["Describe the image."], [img], "cpu")
        with torch.no_grad():
            with_image = torch.log_softmax(model(**enc).logits[0, -1].float(), -1).max().item()
            enc.pop("pixel_values")
            without = torch.log_softmax(model(**enc).logits[0, -1].float(), -1).max().item()
        served = out.choices[0].logprobs.content[0].logprob
        assert abs(served - with_image) < 1e-4 and abs(with_image - without) > 1e-3, (served, with_image, without)
        assert out.usage.prompt_tokens > 4
        chunks = [c.choices[0].delta.content or "" for c in ask(_data_uri(img), stream=True) if c.choices]
        assert "".join(chunks) == expected
        with pytest.raises(openai.BadRequestError, match="SSRF"):
            ask("https://example.com/cat.png")
        with pytest.raises(openai.BadRequestError, match="at most 4"):
            ask(*[_data_uri(img)] * 5)
        noise = Image.frombytes("RGB", (64, 64), random.Random(0).randbytes(64 * 64 * 3))
        with pytest.raises(openai.APIStatusError) as e:
            ask(_data_uri(noise))
        assert e.value.status_code == 413 and "max_image_bytes" in str(e.value)
        with pytest.raises(openai.BadRequestError, match="not a readable image"):
            ask("data:image/png;base64,aGVsbG8gd29ybGQ=")
        with pytest.raises(openai.BadRequestError, match="not valid base64"):
            ask("data:image/png;base64,@@@")
        with pytest.raises(openai.BadRequestError, match="deny"):
            ask(_data_uri(img), text="say something forbidden")
    finally:
        assert srv.stop() == 0


def test_remote_images_are_fetched_only_when_allowed_and_within_the_size_limit(tmp_path):
    """serve.allow_remote_images: an http(s) image_url is fetched (a local server stands in for the
    web), a larger one than serve.max_image_bytes is a 413 without reading past the limit, a
    failed fetch a 400 naming it; off (the default), the URL is refused before any request."""
    import http.server
    import threading
    from types import SimpleNamespace

    from llmctl.server.images import image_bytes
    from llmctl.server.schemas import ApiError

    (tmp_path / "small.png").write_bytes(b"\x89PNG" + b"x" * 100)
    (tmp_path / "big.png").write_bytes(b"\x89PNG" + b"x" * 5000)
    hits = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(tmp_path), **kw)

        def log_message(self, *a):
            hits.append(self.path)

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        allowed = SimpleNamespace(allow_remote_images=True, max_image_bytes=1000)
        assert image_bytes(f"{url}/small.png", allowed, "p") == (tmp_path / "small.png").read_bytes()
        with pytest.raises(ApiError) as e:
            image_bytes(f"{url}/big.png", allowed, "p")
        assert e.value.status == 413 and "max_image_bytes" in e.value.message
        with pytest.raises(ApiError) as e:
            image_bytes(f"{url}/absent.png", allowed, "p")
        assert e.value.status == 400 and "cannot fetch" in e.value.message
        n = len(hits)
        with pytest.raises(ApiError) as e:
            image_bytes(f"{url}/small.png", SimpleNamespace(allow_remote_images=False, max_image_bytes=1000), "p")
        assert e.value.status == 400 and "SSRF" in e.value.message and len(hits) == n  # never fetched
    finally:
        srv.shutdown()


def test_a_remote_image_being_fetched_does_not_hold_other_clients(trained, tmp_path):
    """With serve.allow_remote_images, the fetch runs off the event loop: while the image's server
    holds its answer, the llmctl server still answers others; once let go, the request is answered."""
    import http.server
    import io
    import threading

    import httpx

    from llmctl.vision.shapes import draw_scene
    from test_serve import Server

    path, run = trained
    buf = io.BytesIO()
    draw_scene(1, ("red", "circle"), "left of", ("blue", "square"), 16, random.Random(2)).save(buf, format="PNG")
    got, release = threading.Event(), threading.Event()

    class Held(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            got.set()
            release.wait(120)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(buf.getvalue())

    pics = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Held)
    threading.Thread(target=pics.serve_forever, daemon=True).start()
    srv = Server(write_config(tmp_path / "serve.yaml", vision_config(run, serve={"allow_remote_images": True})))
    answer = {}
    try:
        body = {"model": "v", "max_tokens": 4, "temperature": 0, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": f"http://127.0.0.1:{pics.server_address[1]}/scene.png"}}, {"type": "text", "text": "Describe the image."}]}]}
        t = threading.Thread(target=lambda: answer.update(r=httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=120)))
        t.start()
        assert got.wait(60), "the server never fetched the image"
        assert httpx.get(srv.url + "/health", timeout=5).status_code == 200  # answered while the fetch is held
        release.set()
        t.join(120)
        assert answer["r"].status_code == 200, answer["r"].text
        assert answer["r"].json()["choices"][0]["message"]["content"]
    finally:
        release.set()
        pics.shutdown()
        assert srv.stop() == 0


# --------------------------------------------------------------------------- export, explain
def test_export_hf_loads_with_the_auto_classes_and_gguf_is_refused_before_any_work(trained, tmp_path):
    """A CLIP tower (the default): llama.cpp's LLaVA graph misplaces its class token, so gguf is refused."""
    path, run = trained
    r = invoke_cli("export", str(path), "--format", "gguf")
    assert r.returncode == 2 and "llama.cpp#25814" in r.stderr and "model.vision.tower: siglip" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not (run / "export").exists() or not any((run / "export").iterdir())
    r = invoke_cli("export", str(path), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["verified"] is True and out["max_abs_diff"]["hf"] <= 1e-4
    from transformers import AutoModelForImageTextToText, AutoProcessor

    hf = run / "export" / "hf"
    AutoModelForImageTextToText.from_pretrained(hf)
    assert type(AutoProcessor.from_pretrained(hf)).__name__ == "LlavaProcessor"
    assert "AutoModelForImageTextToText" in (hf / "README.md").read_text()
    # A config that asks for gguf is refused when loaded, before prepare or train ever run.
    cfg = vision_config(tmp_path / "run2", export={"formats": ["hf", "gguf"]})
    r = invoke_cli("prepare", str(write_config(tmp_path / "g.yaml", cfg)))
    assert r.returncode == 2 and "llama.cpp#25814" in r.stderr and not (tmp_path / "run2").exists(), r.stderr


# --------------------------------------------------------------------------- export gguf: llama.cpp's model + mmproj
@pytest.fixture(scope="module")
def siglip_exported(tmp_path_factory):
    """(config path, run dir): a tiny SigLIP-tower LLaVA trained 30 steps (enough to say words, so that two
    runtimes' greedy captions can be compared) and exported as hf + gguf (f32)."""
    tmp = tmp_path_factory.mktemp("siglip")
    cfg = vision_config(tmp / "run", model={"vision": {"tower": "siglip", "image_size": 16, "patch_size": 8, "hidden_size": 32,
                                                       "n_layers": 1, "n_heads": 2}},
                        train={"max_steps": 30, "lr": 0.01, "eval_every": 30, "save_every": 30, "log_every": 10},
                        export={"formats": ["hf", "gguf"], "gguf_types": ["f32"], "report": False})
    path = write_config(tmp / "cfg.yaml", cfg)
    for stage in ("prepare", "train", "export"):
        r = invoke_cli(stage, str(path))
        assert r.returncode == 0, r.stderr
    return path, tmp / "run"


def test_export_gguf_writes_the_language_model_and_an_mmproj_that_reads_back(siglip_exported):
    """Without llama.cpp: both files read back with gguf's reader, the mmproj's keys and tensor shapes
    against the trained model, names against gguf-py's own table of clip.cpp's names."""
    import gguf
    import numpy as np
    from transformers import AutoModelForImageTextToText

    from llmctl.vision.infer import PLAIN_CHAT_TEMPLATE

    _, run = siglip_exported
    model = AutoModelForImageTextToText.from_pretrained(run / "train" / "model")
    v, t = model.config.vision_config, model.config.text_config
    r = gguf.GGUFReader(str(run / "export" / "gguf" / "mmproj-f32.gguf"))
    kv = {k: f.contents() for k, f in r.fields.items()}
    assert kv["general.architecture"] == "clip" and kv["general.type"] == "mmproj" and kv["clip.projector_type"] == "mlp"
    assert (kv["clip.vision.image_size"], kv["clip.vision.patch_size"], kv["clip.vision.embedding_length"]) == (16, 8, 32)
    assert (kv["clip.vision.block_count"], kv["clip.vision.attention.head_count"], kv["clip.vision.feed_forward_length"]) == (1, 2, 128)
    assert kv["clip.vision.projection_dim"] == t.hidden_size and kv["clip.use_gelu"] is True
    assert kv["clip.vision.attention.layer_norm_epsilon"] == pytest.approx(v.layer_norm_eps) and v.model_type == "siglip_vision_model"
    assert kv["clip.vision.feature_layer"] == [1]  # vision_feature_layer -1 of one block: after block 1, not clip.cpp's default
    assert np.allclose(kv["clip.vision.image_mean"], [0.5] * 3) and np.allclose(kv["clip.vision.image_std"], [0.5] * 3)
    shapes = {x.name: [int(d) for d in x.shape] for x in r.tensors}  # ggml order: the HF shape reversed
    sd = model.state_dict()
    tower = "model.vision_tower.vision_model." if any(k.startswith("model.vision_tower.vision_model.") for k in sd) else "model.vision_tower."
    assert shapes["v.patch_embd.weight"] == [8, 8, 3, 32] and shapes["v.position_embd.weight"] == [32, 4]
    assert shapes["mm.0.weight"] == [32, t.hidden_size] and shapes["mm.2.weight"] == [t.hidden_size, t.hidden_size]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, 1)
    for key, value in sd.items():
        if key.startswith(tower) and "post_layernorm" not in key:
            hf_name = "vision_tower.vision_model." + key.removeprefix(tower)
            gname = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            assert gname in shapes and shapes[gname] == list(reversed(value.shape)), (key, gname)
    assert not any("post_ln" in n or "class_embd" in n for n in shapes)  # LLaVA reads states before post_layernorm; SigLIP has no CLS
    lm = gguf.GGUFReader(str(run / "export" / "gguf" / "model-f32.gguf"))
    assert lm.fields["general.architecture"].contents() == "llama"
    assert lm.fields["tokenizer.chat_template"].contents() == PLAIN_CHAT_TEMPLATE
    assert lm.fields["llama.embedding_length"].contents() == t.hidden_size
    m = json.loads((run / "export" / "manifest.json").read_text())
    ver = m["verification"]
    assert ver["gguf:f32"]["passed"] and ver["gguf:f32"]["intended_weights"]["passed"] and ver["gguf:f32"]["tokenizer"]["passed"]
    assert ver["gguf:mmproj"]["passed"] and ver["gguf:mmproj"]["read_back"]["problems"] == []
    assert ver["gguf:mmproj"]["max_abs_diff"] == 0.0  # f32: the features from the file are the model's
    assert m["formats_info"]["gguf"]["mmproj"] == "mmproj-f32.gguf"


def test_export_card_and_manifest_list_both_gguf_files(siglip_exported):
    _, run = siglip_exported
    card = (run / "export" / "hf" / "README.md").read_text()
    assert "gguf/model-f32.gguf" in card and "gguf/mmproj-f32.gguf" in card and "llama-mtmd-cli" in card
    files = json.loads((run / "export" / "manifest.json").read_text())["files"]
    assert {"gguf/model-f32.gguf", "gguf/mmproj-f32.gguf"} <= set(files) and all(len(files[f]["sha256"]) == 64 for f in files)


def test_the_gguf_chat_template_is_the_prompt_rule(siglip_exported):
    """llama.cpp formats a turn with the template the language GGUF carries: it must build the text
    llmctl's prompt rule builds (a processor without a template: `<image>question\\n`)."""
    from transformers import AutoProcessor

    from llmctl.vision.infer import PLAIN_CHAT_TEMPLATE, prompt_text

    _, run = siglip_exported
    proc = AutoProcessor.from_pretrained(run / "train" / "model")
    assert not getattr(proc, "chat_template", None)
    q = "What is left of the square?"
    msgs = [{"role": "user", "content": proc.image_token + q}]
    text = proc.tokenizer.apply_chat_template(msgs, chat_template=PLAIN_CHAT_TEMPLATE, tokenize=False, add_generation_prompt=True)
    assert text == prompt_text(proc, q)


def _llama_mtmd_cli():
    from llmctl.exporters.gguf import llama_cpp

    return llama_cpp("llama-mtmd-cli")


@pytest.mark.skipif(_llama_mtmd_cli() is None, reason="llama.cpp's llama-mtmd-cli not installed (LLAMA_CPP_BIN, PATH or /opt/llamacpp/build/bin)")
def test_llama_mtmd_cli_describes_a_picture_as_llmctl_generate_does(siglip_exported, tmp_path):
    """The real runtime: llama.cpp's multimodal CLI on the exported pair, greedy, gives the caption
    `llmctl generate --image` gives, on builtin shape pictures it never trained on."""
    from llmctl.exporters import mmproj
    from llmctl.vision.shapes import draw_scene

    path, run = siglip_exported
    ver = json.loads((run / "export" / "manifest.json").read_text())["verification"]["gguf:mmproj"]
    assert ver["llama_cpp_describe"]["passed"], ver  # export ran it too, on its probe image
    g = run / "export" / "gguf"
    scenes = [(2, ("red", "circle"), "left of", ("blue", "square")), (1, ("yellow", "triangle"), "below", ("green", "circle"))]
    for i, scene in enumerate(scenes):
        img = tmp_path / f"scene{i}.png"
        draw_scene(*scene, 16, random.Random(i)).save(img)
        r = invoke_cli("generate", str(path), "--image", str(img), "-p", "Describe the image.", "--json", "--set", "generate.max_new_tokens=8")
        assert r.returncode == 0, r.stderr
        ours = json.loads(r.stdout)["results"][0]["output"].strip()
        theirs = mmproj.llama_cpp_describe(g / "model-f32.gguf", g / "mmproj-f32.gguf", img, "Describe the image.", 8).strip()
        assert theirs == ours and ours, (theirs, ours)


def _llama_server():
    from llmctl.exporters.gguf import llama_cpp

    return llama_cpp("llama-server")


@pytest.mark.skipif(_llama_server() is None, reason="llama.cpp's llama-server not installed (LLAMA_CPP_BIN, PATH or /opt/llamacpp/build/bin)")
def test_llama_server_with_the_mmproj_gives_transformers_next_token_logprobs(siglip_exported):
    """The real runtime, sensitive to the picture even where a tiny model's greedy caption is not:
    llama-server with the mmproj gives the next-token logprobs transformers gives, on pictures
    (a shapes scene, plain black, plain white) whose logprobs differ far more than the runtimes do."""
    import base64
    import http.client
    import io

    import torch
    from PIL import Image

    from llmctl.exporters.image_text import load_trained, logits, probe_inputs
    from llmctl.inference.llamacpp import LlamaServer
    from llmctl.vision.shapes import draw_scene

    _, run = siglip_exported
    g = run / "export" / "gguf"
    model, proc = load_trained(run / "train" / "model")

    class WithMmproj(LlamaServer):
        def command(self):
            return super().command() + ["--mmproj", str(g / "mmproj-f32.gguf")]

    def post(path, body=None):
        c = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=120)
        c.request("POST" if body else "GET", path, json.dumps(body) if body else None, {"Content-Type": "application/json"})
        return json.loads(c.getresponse().read())

    srv = WithMmproj(g / "model-f32.gguf", slots=1, context=128, threads=2)
    srv.start()
    try:
        marker = post("/props")["media_marker"]  # the server's own placeholder for a picture
        ours, gaps = [], []
        pictures = [draw_scene(2, ("red", "circle"), "left of", ("blue", "square"), 16, random.Random(0)),
                    Image.new("RGB", (16, 16), (0, 0, 0)), Image.new("RGB", (16, 16), (255, 255, 255))]
        for img in pictures:
            png = io.BytesIO()
            img.save(png, format="PNG")
            res = post("/completion", {"prompt": {"prompt_string": marker + "Describe the image.\n", "multimodal_data": [base64.b64encode(png.getvalue()).decode()]},
                                       "n_predict": 1, "n_probs": 8, "temperature": 0, "cache_prompt": False})
            lp = torch.log_softmax(logits(model, probe_inputs(proc, img, "Describe the image."))[0, -1], -1)
            top = res["completion_probabilities"][0]["top_logprobs"]
            gaps += [abs(t["logprob"] - float(lp[t["id"]])) for t in top]
            ours.append(lp)
    finally:
        srv.stop()
    between = max(float((a - b).abs().max()) for a in ours for b in ours)
    assert max(gaps) < 2e-3 and between > 100 * max(gaps), (max(gaps), between)


def test_gguf_refusals_name_why_before_any_work(tmp_path):
    """What llama.cpp cannot run as trained is refused at config load (a CLIP tower) or on the loaded
    model (anything else the mmproj cannot say), never after writing files."""
    import torch
    from transformers import AutoModelForImageTextToText, LlamaConfig, LlavaConfig, SiglipVisionConfig

    from llmctl.errors import ConfigError
    from llmctl.exporters import mmproj

    ok = vision_config(tmp_path / "run", model={"vision": {"tower": "siglip", "image_size": 16, "patch_size": 8}}, export={"formats": ["gguf"]})
    assert invoke_cli("config", "validate", str(write_config(tmp_path / "ok.yaml", ok))).returncode == 0
    vc = SiglipVisionConfig(image_size=16, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    tc = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)

    class Proc:  # what check_supported reads of a processor
        image_processor = type("IP", (), {"size": {"height": 16, "width": 16}, "do_normalize": True, "rescale_factor": 1 / 255})()
        tokenizer = None

    cases = [({"vision_feature_select_strategy": "default"}, "vision_feature_select_strategy is 'default'"),
             ({"vision_feature_layer": [-2, -1]}, "several layers"),
             ({"projector_hidden_act": "relu"}, "projector_hidden_act is 'relu'")]
    for over, says in cases:
        kw = {"vision_feature_select_strategy": "full", "vision_feature_layer": -1, "projector_hidden_act": "gelu", **over}
        model = AutoModelForImageTextToText.from_config(LlavaConfig(vision_config=vc, text_config=tc, image_token_id=5, **kw), dtype=torch.float32)
        with pytest.raises(ConfigError, match=says):
            mmproj.check_supported(model, Proc())
    assert mmproj.feature_layer(model) == 2  # -1 of two blocks: clip.cpp's index 2
    from llmctl.export_support import check_image_text_formats

    with pytest.raises(ConfigError, match="not 'qwen2_vl'"):  # a pretrained model's type, read from its config.json at load
        check_image_text_formats(["hf", "gguf"], model_type="qwen2_vl")
    check_image_text_formats(["hf", "gguf"], model_type="llava")  # the loaded model is checked in full by export


def test_explain_image_writes_a_patch_heatmap(trained, tmp_path):
    from llmctl.vision.shapes import draw_scene

    path, run = trained
    img = tmp_path / "scene.png"
    draw_scene(1, ("red", "square"), "left of", ("blue", "circle"), 16, random.Random(2)).save(img)
    r = invoke_cli("explain", str(path), "--image", str(img), "-p", "Describe the image.", "-t", "one red square left of a blue circle", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    grid = res["patch_saliency"]
    assert len(grid) == 2 and all(len(row) == 2 for row in grid)  # (16/8)^2 patches
    assert max(max(row) for row in grid) == 1.0 and res["target_logprob"] < 0
    assert [t["token"] for t in res["target_tokens"]] and "".join(t["token"] for t in res["target_tokens"]).strip() == res["target"]
    page = (run / "explain" / "explain.html").read_text()
    assert "data:image/png;base64," in page and page.count("rgba(230,0,0,") == 4
    # The heatmap is the picture's: another scene, same caption, gives other saliencies.
    other = tmp_path / "other.png"
    draw_scene(2, ("yellow", "triangle"), "below", ("green", "square"), 16, random.Random(5)).save(other)
    r = invoke_cli("explain", str(path), "--image", str(other), "-p", "Describe the image.", "-t", "one red square left of a blue circle", "--json")
    assert r.returncode == 0, r.stderr
    again = json.loads(r.stdout)
    assert again["patch_saliency"] != grid and again["target_logprob"] != res["target_logprob"]


# --------------------------------------------------------------------------- eval
def test_eval_scores_captions_against_the_majority_caption_and_the_untrained_model(trained):
    from datasets import load_from_disk

    path, run = trained
    r = invoke_cli("eval", str(path), "--json")
    assert r.returncode == 0, r.stderr
    head = json.loads(r.stdout)
    res = json.loads((run / "eval" / "results.json").read_text())
    assert res["split"] == "validation" and 1 < head["perplexity"] < head["init_perplexity"]
    pairs = load_from_disk(str(run / "prepare" / "pairs"))
    refs = pairs["validation"]["reference"][:8]
    majority = res["majority_caption"]["caption"]
    assert head["baseline_majority_exact_match"] == round(sum(x == majority for x in refs) / len(refs), 4)
    assert head["examples"] == 8 and "init_exact_match" in head and "baseline_majority_bleu" in head
    assert res["other_splits"]["test"]["generation"]["examples"] == min(8, len(pairs["test"]))
    preds = [json.loads(x) for x in (run / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert [p["reference"] for p in preds] == refs
    r = invoke_cli("eval", str(path), "--force", "--set", "eval.thresholds.exact_match_min=0.99", "--set", "eval.compare_init=false")
    assert r.returncode == 4 and "exact_match" in r.stderr


def test_chat_rows_with_image_parts(tmp_path):
    rows = image_rows(tmp_path / "data", n=10)
    chat = [{"messages": [{"role": "user", "content": [{"type": "image", "path": r["image"]}, {"type": "text", "text": "What is here?"}]},
                          {"role": "assistant", "content": r["caption"]}]} for r in rows]
    path = files_config(tmp_path, chat)
    r = invoke_cli("prepare", str(path), "--json")
    assert r.returncode == 0, r.stderr
    from datasets import load_from_disk

    pairs = load_from_disk(str(tmp_path / "run" / "prepare" / "pairs"))["validation"]
    assert set(pairs["prompt"]) == {"What is here?"} and set(pairs["reference"]) <= {x["caption"] for x in rows}
    bad = chat[:3] + [{"messages": [{"role": "user", "content": "no image"}, {"role": "assistant", "content": "x"}]}]
    r = invoke_cli("prepare", str(files_config(tmp_path, bad)), "--force")
    assert r.returncode == 2 and "rows.jsonl:4:" in r.stderr and "exactly one" in r.stderr


def test_fine_tune_a_pretrained_image_text_directory(trained, tmp_path):
    """model.name_or_path: an AutoModelForImageTextToText directory (here the fixture's export of
    train/model), its processor from the same directory; LoRA on the language model only."""
    _, run = trained
    base = str(run / "train" / "model")
    rows = image_rows(tmp_path / "data", n=16)
    data_file = write_jsonl(tmp_path / "data" / "rows.jsonl", rows)
    cfg = vision_config(tmp_path / "run", data={"source": "files", "paths": [str(data_file)], "validation_fraction": 0.25, "test_fraction": 0.0},
                        tokenizer={"name_or_path": base}, model={"name_or_path": base, "freeze": ["vision", "projector"]})
    path = write_config(tmp_path / "cfg.yaml", cfg)
    assert invoke_cli("prepare", str(path)).returncode == 0
    r = invoke_cli("train", str(path), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["steps"] == 4 and out["trainable_parameters"] < out["parameters"]
    r = invoke_cli("eval", str(path), "--json")
    assert r.returncode == 0, r.stderr


def test_config_refuses_what_image_text_cannot_do(tmp_path):
    cases = [({"model": {"freeze": ["vision"]}, "data": {"format": "text"}}, "applies to image-text models only"),
             ({"model": {"freeze": ["vision"], "lora": {"enabled": True}}}, "gate_proj"),
             ({"model": {"arch": "gpt2"}}, "set model.arch: llama"),
             ({"model": {"vision": {"image_size": 30, "patch_size": 8}}}, "multiple of"),
             ({"export": {"formats": ["onnx"]}}, "pixel_values")]
    for i, (over, says) in enumerate(cases):
        cfg = vision_config(tmp_path / "run")
        for k, v in over.items():
            cfg[k] = {**cfg.get(k, {}), **v}
        r = invoke_cli("config", "validate", str(write_config(tmp_path / f"c{i}.yaml", cfg)))
        assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, (over, r.stderr)


@pytest.mark.slow
def test_train_under_torchrun_with_two_ranks(tmp_path):
    path = write_config(tmp_path / "cfg.yaml", vision_config(tmp_path / "run"))
    assert invoke_cli("prepare", str(path)).returncode == 0
    r = run_cli("train", str(path), "--nproc", "2", "--json", env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out["world_size"] == 2 and out["steps"] == 4
    from transformers import AutoModelForImageTextToText, AutoProcessor

    AutoModelForImageTextToText.from_pretrained(tmp_path / "run" / "train" / "model")
    AutoProcessor.from_pretrained(tmp_path / "run" / "train" / "model")


# --------------------------------------------------------------------------- pretrained architectures
# Tiny random checkpoints of the architectures behind the image-text hub models, saved as a hub
# download is (weights, config, tokenizer with its chat template, the image processor), built here:
# nothing comes from the hub. Their chat templates are the real models' (SmolVLM-Instruct's, Qwen2-VL-Instruct's).
SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}{% if message['content'][0]['type'] == 'image' %}{{':'}}"
    "{% else %}{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")
QWEN2VL_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _tiny_tokenizer(out: Path, specials: list[str], eos: str):
    from conftest import train_tiny_tokenizer
    from llmctl.vision import shapes

    texts = [rec["caption"] for rec, _ in shapes.scenes(60, 0, 16, 0.0)] + ["Describe the image."] * 5
    tok = train_tiny_tokenizer(texts, out, vocab_size=300)
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.eos_token = eos
    return tok


def _text_config(tok, **kw) -> dict:
    return dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                max_position_embeddings=256, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **kw)


def build_tiny_idefics3(out: Path) -> Path:
    """SmolVLM's architecture (Idefics3): SigLIP 32x32 in 8x8 patches, pixel shuffle by 2 -> 4 image tokens."""
    import torch
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessorPil, Idefics3Processor

    tok = _tiny_tokenizer(out, ["<|im_start|>", "<global-img>"], eos="<end_of_utterance>")
    ip = Idefics3ImageProcessorPil(do_image_splitting=False, size={"longest_edge": 32}, max_image_size={"longest_edge": 32})
    proc = Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=4, chat_template=SMOLVLM_TEMPLATE)  # adds <image>, <end_of_utterance>
    cfg = Idefics3Config(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8),
                         text_config=_text_config(proc.tokenizer, model_type="llama"), image_token_id=proc.image_token_id, scale_factor=2)
    torch.manual_seed(0)
    Idefics3ForConditionalGeneration(cfg).save_pretrained(out)
    proc.save_pretrained(out)
    return out


def build_tiny_qwen2_vl(out: Path, version: str = "2") -> Path:
    """Qwen2-VL (version "2") or Qwen2.5-VL ("2.5"): a ViT on 8x8 patches (x2 frames), 2x2 merged -> 4 image
    tokens for a 32x32 image; M-RoPE. Saved as the hub's Qwen checkpoints are: tokenizer + chat template,
    preprocessor_config.json naming the processor (whose video processor needs torchvision: llmctl builds it without)."""
    import torch
    import transformers
    from transformers import Qwen2VLImageProcessorPil

    prefix = {"2": "Qwen2VL", "2.5": "Qwen2_5_VL"}[version]
    vision = {"2": dict(depth=1, embed_dim=32, hidden_size=32, mlp_ratio=2),
              "2.5": dict(depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=32, window_size=16, fullatt_block_indexes=[1])}[version]

    tok = _tiny_tokenizer(out, ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"], eos="<|im_end|>")
    tok.chat_template = QWEN2VL_TEMPLATE
    tok.save_pretrained(out)
    ip = Qwen2VLImageProcessorPil(size={"shortest_edge": 16 * 16, "longest_edge": 32 * 32}, patch_size=8, merge_size=2, temporal_patch_size=2)
    ip.save_pretrained(out)
    pre = json.loads((out / "preprocessor_config.json").read_text())
    (out / "preprocessor_config.json").write_text(json.dumps({**pre, "processor_class": f"{prefix}Processor"}))
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")}
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}  # sums to head_dim / 2
    cfg = getattr(transformers, f"{prefix}Config")(
                        text_config=_text_config(tok, rope_parameters=rope),
                        vision_config=dict(num_heads=2, patch_size=8, spatial_merge_size=2, temporal_patch_size=2, **vision),
                        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                        vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(0)
    getattr(transformers, f"{prefix}ForConditionalGeneration")(cfg).save_pretrained(out)
    return out


ARCHS = {"idefics3": build_tiny_idefics3, "qwen2_vl": build_tiny_qwen2_vl, "qwen2_5_vl": lambda out: build_tiny_qwen2_vl(out, "2.5")}


@pytest.fixture(scope="module")
def hub_vlm(request, tmp_path_factory) -> Path:
    """A tiny random image-text checkpoint directory of one architecture (the test's parameter), as a user's hub download."""
    return ARCHS[request.param](tmp_path_factory.mktemp(request.param))


def hub_config(run_dir: Path, base: Path, **sections) -> dict:
    """The builtin shapes (32x32) on a pretrained checkpoint: its processor, its weights."""
    cfg = vision_config(run_dir, data={"block_size": 96, "image": {"builtin_images": 40}}, tokenizer={"name_or_path": str(base)},
                        model={"name_or_path": str(base), "vision": {"image_size": 32}}, train={"lr": 1e-2, "eval_every": 4, "save_every": 4})
    for k, v in sections.items():
        cfg.setdefault(k, {}).update(v)
    return cfg


def _state(path: Path) -> dict:
    from transformers import AutoModelForImageTextToText

    return {k: v.detach().clone() for k, v in AutoModelForImageTextToText.from_pretrained(path).state_dict().items()}


def _changed_parts(before: dict, after: dict) -> set[str]:
    """The parts (llmctl.vision.model.part_of) holding a tensor that is not bit-identical."""
    from llmctl.vision.model import part_of

    assert before.keys() == after.keys()
    return {part_of(k) for k in before if not torch_equal(before[k], after[k])}


def torch_equal(a, b) -> bool:
    import torch

    return a.shape == b.shape and bool(torch.equal(a, b))


@pytest.mark.parametrize("hub_vlm", sorted(ARCHS), indirect=True)
def test_pretrained_architectures_prepare_train_frozen_vision_eval_generate(hub_vlm, tmp_path):
    """A hub-style checkpoint of each architecture: prepare with its own processor (image tokens
    expanded its way, loss on the answer only), train with model.freeze [vision] (the tower
    bit-identical, the projector and language model moved), eval, generate --image."""
    from datasets import load_from_disk

    from llmctl.vision import shapes
    from llmctl.vision.infer import load_processor

    path = write_config(tmp_path / "cfg.yaml", hub_config(tmp_path / "run", hub_vlm, model={"freeze": ["vision"]}))
    r = invoke_cli("prepare", str(path), "--json")
    assert r.returncode == 0, r.stderr
    proc = load_processor(tmp_path / "run" / "prepare" / "tokenizer")
    assert type(proc).__name__ == type(load_processor(hub_vlm)).__name__
    tok = proc.tokenizer
    captions = {rec["caption"] for rec, _ in shapes.scenes(40, 0, 32, 0.15)}
    image_id = tok.convert_tokens_to_ids(proc.image_token)
    rows = load_from_disk(str(tmp_path / "run" / "prepare" / "dataset"))["train"]
    assert len(rows) > 20
    starts = set()
    for row in rows:
        ids, labels = row["input_ids"], row["labels"]
        first = next(i for i, x in enumerate(labels) if x != -100)
        starts.add(first)
        # -100 over the whole prompt (template, question, every image token); the answer and EOS after it, nothing masked there.
        assert all(x == -100 for x in labels[:first]) and labels[first:] == ids[first:] and labels[-1] == tok.eos_token_id
        assert tok.decode(labels[first:-1], skip_special_tokens=True).strip() in captions
        assert ids[:first].count(image_id) == 4 and image_id not in ids[first:]  # the processor's expansion: 4 tokens for 32x32
        if "mm_token_type_ids" in row:  # Qwen2-VL: image positions marked, the answer is text
            assert len(row["mm_token_type_ids"]) == len(ids) and sum(row["mm_token_type_ids"]) == 4
    assert len(starts) == 1  # one question, one image size: every prompt the same length
    first = starts.pop()
    prompt = tok.decode(rows[0]["input_ids"][:first])
    assert prompt.endswith(("Assistant:", "assistant\n")) and "Describe the image." in prompt  # the model's own chat template
    # The answer is the assistant turn as the model's template writes it (SmolVLM's " caption" after "Assistant:"), ended by EOS.
    caption = tok.decode(rows[0]["labels"][first:-1], skip_special_tokens=True).strip()
    user = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    turn = proc.apply_chat_template(user + [{"role": "assistant", "content": [{"type": "text", "text": caption}]}], tokenize=False)
    gen = proc.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    assert tok.decode(rows[0]["labels"][first:]) == turn[len(gen):].rstrip()

    before = _state(hub_vlm)
    r = invoke_cli("train", str(path), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["steps"] == 4 and out["trainable_parameters"] < out["parameters"]
    assert _changed_parts(before, _state(tmp_path / "run" / "train" / "model")) == {"projector", "language"}
    assert type(load_processor(tmp_path / "run" / "train" / "model")).__name__ == type(proc).__name__  # saved with the model

    r = invoke_cli("eval", str(path), "--json")
    assert r.returncode == 0, r.stderr
    head = json.loads(r.stdout)
    assert 1 < head["perplexity"] < 1000 and head["examples"] > 0

    img = tmp_path / "scene.png"
    shapes.draw_scene(1, ("red", "circle"), "above", ("blue", "square"), 32, random.Random(0)).save(img)
    r = invoke_cli("generate", str(path), "--image", str(img), "-p", "Describe the image.", "--set", "generate.max_new_tokens=6", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)["results"][0]
    assert isinstance(res["output"], str) and res["prompt_tokens"] == len(rows[0]["input_ids"]) - len([x for x in rows[0]["labels"] if x != -100])
    assert res["completion_tokens"] > 0 or res["finish_reason"] == "eos"

    # explain: a saliency per patch, laid out as the image's 4x4 patches (Qwen's come in 2x2 merge blocks: put back in place).
    r = invoke_cli("explain", str(path), "--image", str(img), "-p", "Describe the image.", "-t", "one red circle above a blue square", "--json")
    assert r.returncode == 0, r.stderr
    grid = json.loads(r.stdout)["patch_saliency"]
    assert len(grid) == 4 and all(len(row) == 4 for row in grid) and max(max(row) for row in grid) == 1.0

    # export hf: reloaded with AutoModelForImageTextToText and the model's own processor (Qwen's without
    # its video part where torchvision is missing), logits compared with the trained model's
    r = invoke_cli("export", str(path), "--set", "export.formats=[hf]", "--json")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert type(load_processor(tmp_path / "run" / "export" / "hf")).__name__ == type(proc).__name__

    if hub_vlm.name.startswith("qwen"):  # M-RoPE: the serving engine's 1-D positions would change its outputs; refused in one line
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        r = invoke_cli("serve", str(path), "--set", f"serve.port={port}")
        assert r.returncode == 2 and "M-RoPE" in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("hub_vlm", ["idefics3", "qwen2_vl"], indirect=True)  # Qwen2.5-VL's LoRA path is Qwen2-VL's
def test_pretrained_architectures_lora_leaves_the_frozen_tower_alone(hub_vlm, tmp_path):
    """LoRA on q_proj/v_proj with model.freeze [vision]: SigLIP (Idefics3) has q_proj/v_proj too, and an
    adapter there would train and be merged into the tower; it gets none. The merged model loads and generates."""
    pytest.importorskip("peft")
    lora = {"enabled": True, "r": 4, "target_modules": ["q_proj", "v_proj"]}
    path = write_config(tmp_path / "cfg.yaml", hub_config(tmp_path / "run", hub_vlm, model={"freeze": ["vision"], "lora": lora}))
    assert invoke_cli("prepare", str(path)).returncode == 0
    r = invoke_cli("train", str(path), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["trainable_parameters"] < out["parameters"] / 10
    from safetensors import safe_open

    with safe_open(tmp_path / "run" / "train" / "adapter" / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert keys and all("lora_" in k and ("language_model" in k or "text_model" in k) for k in keys), keys
    after = _state(tmp_path / "run" / "train" / "model")
    assert not any("lora" in k for k in after)
    assert _changed_parts(_state(hub_vlm), after) == {"language"}  # the adapters sat in the language model's attention only
    img = tmp_path / "scene.png"
    from llmctl.vision.shapes import draw_scene

    draw_scene(2, ("green", "triangle"), "below", ("red", "square"), 32, random.Random(3)).save(img)
    r = invoke_cli("generate", str(path), "--image", str(img), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["outputs"] == 1


@pytest.mark.slow  # ~30 s each (three trainings, one killed); the default tier's test_resume_after_sigkill_matches_the_uninterrupted_run covers the same resume path (ImageTextTrainer)
@pytest.mark.parametrize("hub_vlm", ["idefics3", "qwen2_vl"], indirect=True)
def test_pretrained_architectures_resume_after_sigkill(hub_vlm, tmp_path):
    """Killed after the step-2 checkpoint, resumed: the same losses as the run that was never interrupted."""
    over = {"train": {"max_steps": 4, "save_every": 2, "eval_every": 100, "log_every": 1}}
    full, resumed = _killed_and_resumed(tmp_path, lambda name: hub_config(tmp_path / name, hub_vlm, **over), 2)
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in (3, 4):
        assert abs(resumed[step] - full[step]) < 1e-4, (step, resumed[step], full[step])


def test_a_processor_that_needs_torchvision_is_refused_before_any_image_is_read(tmp_path):
    """SmolVLM2's processor (SmolVLMProcessor) takes a video processor, which needs torchvision: one line, exit 2."""
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        pytest.skip("torchvision is installed here")
    base = build_tiny_idefics3(tmp_path / "smolvlm2")
    conf = json.loads((base / "processor_config.json").read_text())
    (base / "processor_config.json").write_text(json.dumps({**conf, "processor_class": "SmolVLMProcessor"}))
    path = write_config(tmp_path / "cfg.yaml", hub_config(tmp_path / "run", base))
    r = invoke_cli("prepare", str(path))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    line = next(x for x in r.stderr.splitlines() if "torchvision" in x)
    assert "SmolVLMProcessor" in line and "Qwen2-VL" in line and "images:" not in r.stderr, r.stderr


@pytest.mark.parametrize("hub_vlm", ["idefics3"], indirect=True)
def test_collator_pads_rows_with_fewer_image_crops(hub_vlm):
    """Idefics3 with image splitting: a wide image gives 3 crops, a larger square one 5; the batch pads
    the first with empty images (which the model skips), and its logits are those it gets alone."""
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText

    from llmctl.vision.infer import Collator, encode_example, load_processor

    proc = load_processor(hub_vlm)
    proc.image_processor.do_image_splitting, proc.image_processor.size = True, {"longest_edge": 64}
    rows = [encode_example(proc, "Describe the image.", "one red circle", Image.new("RGB", (64, 32), (200, 10, 10))),
            encode_example(proc, "Describe the image.", "two blue squares", Image.new("RGB", (64, 64), (10, 10, 200)))]
    assert [len(r["pixel_values"]) for r in rows] == [3, 5]
    collate = Collator(proc.tokenizer.pad_token_id)
    batch = collate(rows)
    assert batch["pixel_values"].shape[:2] == (2, 5) and batch["pixel_attention_mask"].shape[:2] == (2, 5)
    model = AutoModelForImageTextToText.from_pretrained(hub_vlm).eval()
    with torch.no_grad():
        both = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        alone = model(**{k: v for k, v in collate(rows[:1]).items() if k != "labels"}).logits
    n = len(rows[0]["input_ids"])
    assert torch.allclose(both[0, :n], alone[0], atol=1e-4)
