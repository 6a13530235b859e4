"""Shared fixtures: tiny tokenizers, datasets and models built on the fly, offline.

`prepared_run` and `trained_run` write run directories that follow the contract in
llmctl/rundir.py without running the real stages, so each stage's tests stand alone.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REPO = Path(__file__).resolve().parents[1]

WORDS = (
    "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing "
    "matches and river stones glow under pale moon light near old bridges"
).split()


def sentences(n: int, seed: int = 0, length: tuple[int, int] = (6, 14)) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(*length))) + "." for _ in range(n)]


def tiny_config_dict(run_dir: Path, **sections) -> dict:
    """A config dict for tiny, fast runs; pass section dicts to override keys."""
    base = {
        "run": {"name": "t", "dir": str(run_dir), "seed": 0},
        # curation off: these fixtures pin exact document counts (tests/test_curate.py covers it)
        "data": {"source": "files", "paths": ["unused.txt"], "block_size": 32, "curate": {"enabled": False}},
        "tokenizer": {"vocab_size": 300, "min_frequency": 1},
        "model": {"arch": "llama", "n_layers": 1, "n_heads": 2, "hidden_size": 32, "intermediate_size": 64, "context_length": 64},
        "train": {"max_steps": 4, "micro_batch_size": 4, "warmup_steps": 0, "eval_every": 2, "save_every": 2, "log_every": 1, "eval_batches": 2},
        "eval": {"batch_size": 4, "max_new_tokens": 8, "max_examples": 8},
        "generate": {"max_new_tokens": 8},
        "export": {"report": False},  # the compression report reloads every artifact: tests/test_quantize.py
    }
    for k, v in sections.items():
        base.setdefault(k, {}).update(v)
    return base


def write_config(path: Path, data: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def train_tiny_tokenizer(texts: list[str], out_dir: Path, vocab_size: int = 300):
    """A byte-level BPE with bos/eos/pad, saved so AutoTokenizer loads it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|bos|>", "<|pad|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|bos|>", pad_token="<|pad|>")
    fast.save_pretrained(out_dir)
    return fast


def build_prepared_run(run_dir: Path, cfg, n_docs: int = 64, with_pairs: bool = True):
    """Write RUN/prepare as the prepare stage would: tokenizer, packed text dataset, pairs."""
    from datasets import Dataset, DatasetDict

    from llmctl.rundir import RunDir

    rd = RunDir(run_dir)
    texts = sentences(n_docs, seed=1)
    bs = cfg.data.block_size
    with rd.begin("prepare", cfg) as st:
        tok = train_tiny_tokenizer(texts, rd.tokenizer_dir, vocab_size=cfg.tokenizer.vocab_size)
        splits = {}
        n_val = max(4, n_docs // 8)
        for name, docs in (("train", texts[n_val:]), ("validation", texts[:n_val])):
            stream: list[int] = []
            for d in docs:
                stream += tok(d)["input_ids"] + [tok.eos_token_id]
            blocks = [stream[i : i + bs] for i in range(0, len(stream) - bs + 1, bs)]
            splits[name] = Dataset.from_dict({"input_ids": blocks, "labels": [list(b) for b in blocks]})
        DatasetDict(splits).save_to_disk(str(rd.dataset_dir))
        if with_pairs:
            prompts = [" ".join(t.split()[:3]) for t in texts[:n_val]]
            refs = [" " + " ".join(t.split()[3:6]) for t in texts[:n_val]]
            DatasetDict({"validation": Dataset.from_dict({"prompt": prompts, "reference": refs})}).save_to_disk(str(rd.pairs_dir))
        st.headline.update({"train_tokens": len(splits["train"]) * bs, "validation_tokens": len(splits["validation"]) * bs})
    return rd


def build_trained_run(run_dir: Path, cfg, seed: int = 0):
    """RUN/prepare plus RUN/train/model: a tiny random llama saved with save_pretrained."""
    return save_random_model(build_prepared_run(run_dir, cfg), cfg, seed=seed)


def save_random_model(rd, cfg, seed: int = 0):
    """RUN/train/model for a prepared run (any format): a tiny random llama, as train would record it."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(rd.tokenizer_dir)
    torch.manual_seed(seed)
    mc = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=cfg.model.hidden_size,
        intermediate_size=cfg.model.intermediate_size or 64,
        num_hidden_layers=cfg.model.n_layers,
        num_attention_heads=cfg.model.n_heads,
        num_key_value_heads=cfg.model.n_kv_heads or cfg.model.n_heads,
        max_position_embeddings=cfg.model.context_length,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(mc)
    with rd.begin("train", cfg, inputs=["prepare"]) as st:
        model.save_pretrained(rd.model_dir)
        tok.save_pretrained(rd.model_dir)
        GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id).save_pretrained(rd.model_dir)
        st.headline.update({"steps": 0})
    return rd


@pytest.fixture
def tiny_cfg(tmp_path):
    """(config path, Config) for a tiny run in tmp_path/run."""
    from llmctl.config import load_config

    path = write_config(tmp_path / "cfg.yaml", tiny_config_dict(tmp_path / "run"))
    return path, load_config(path)


@pytest.fixture
def prepared_run(tiny_cfg):
    path, cfg = tiny_cfg
    return path, cfg, build_prepared_run(Path(cfg.run.dir), cfg)


@pytest.fixture
def trained_run(tiny_cfg):
    path, cfg = tiny_cfg
    return path, cfg, build_trained_run(Path(cfg.run.dir), cfg)


def run_cli(*args: str, cwd: Path | None = None, input: str | None = None, timeout: float = 300, env: dict | None = None):
    """Run `python -m llmctl ARGS` in a subprocess; returns CompletedProcess."""
    import subprocess
    import sys

    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "llmctl", *args],
        cwd=cwd or REPO,
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=e,
    )


def invoke_cli(*args: str, cwd: Path | None = None, input: str | None = None, env: dict | None = None):
    """`llmctl ARGS` in this process, through the same entry point (`llmctl.cli.main`); returns a
    CompletedProcess like `run_cli`, without paying a fresh interpreter and torch import (seconds).

    What the process would show is kept: exit code, stdout, stderr, warnings on stderr, a bug's
    traceback on stderr with exit 1. What a command changes in the process (environment, cwd,
    warning filters, logging, SIGTERM handler, the current console, torch's thread count) is put
    back afterwards. Use `run_cli` where the test is about the process: signals, kills, torchrun,
    a server that keeps running, anything read at import time.
    """
    import logging
    import signal
    import subprocess
    import sys
    import traceback
    import warnings

    from click.testing import CliRunner

    from llmctl import cli, console

    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch else None
    saved = (dict(os.environ), os.getcwd(), sys.argv, logging.root.manager.disable, signal.getsignal(signal.SIGTERM), console._current)
    code = 0
    try:
        with warnings.catch_warnings(), CliRunner().isolation(input=input, env=env) as (out, err, _):
            # a fresh interpreter's warning filters, and warnings printed on this call's stderr
            warnings.resetwarnings()
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", category)
            warnings.showwarning = lambda m, c, f, n, file=None, line=None: sys.stderr.write(warnings.formatwarning(m, c, f, n, line))
            os.chdir(cwd or REPO)
            sys.argv = ["llmctl", *args]
            try:
                cli.main()
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                if isinstance(e.code, str):
                    sys.stderr.write(e.code + "\n")
            except Exception:
                sys.stderr.write(traceback.format_exc())
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            stdout, stderr = out.getvalue().decode(), err.getvalue().decode()
    finally:
        environ, cwd_, sys.argv, disable, sigterm, console._current = saved
        os.environ.clear()
        os.environ.update(environ)
        os.chdir(cwd_)
        logging.disable(disable)
        signal.signal(signal.SIGTERM, sigterm)
        if threads is not None:
            torch.set_num_threads(threads)
    return subprocess.CompletedProcess(["llmctl", *args], code, stdout, stderr)


SOURCE_WITH_BLANKS = '''import os


class Config:
    """A config file reader."""

    def __init__(self, path):
        self.path = path

        self.values = {}


    def read(self):
        with open(self.path) as f:
            for line in f:

                key, _, value = line.partition("=")
                self.values[key.strip()] = value.strip()
        return self.values
'''


def build_sharp_model(out_dir: Path, text: str, steps: int = 80, window: int = 24, seed: int = 0):
    """A tiny llama trained on `text` until it predicts it sharply (loss far below ln V).

    A random model's loss is ~ln V whatever the context, which hides windowing and text-handling
    bugs in perplexity code; this one's loss depends on every token it sees. Returns out_dir.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok = train_tiny_tokenizer([text], out_dir, vocab_size=300)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      max_position_embeddings=128, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    s = [tok.bos_token_id] + ids
    starts = list(range(0, max(1, len(s) - window), max(1, window // 3)))
    batch = torch.tensor([s[i : i + window + 1] + [tok.pad_token_id] * (window + 1 - len(s[i : i + window + 1])) for i in starts])
    labels = batch.clone()
    labels[batch == tok.pad_token_id] = -100
    model.train()
    for _ in range(steps):
        loss = model(input_ids=batch, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(out_dir)
    GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id).save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def sharp_model(tmp_path_factory):
    """`sharp_model(steps)`: build_sharp_model on SOURCE_WITH_BLANKS, built once per session for
    each step count (several tests score the same model). Read it, never write into it."""
    built: dict[int, Path] = {}

    def get(steps: int = 80) -> Path:
        if steps not in built:
            built[steps] = build_sharp_model(tmp_path_factory.mktemp(f"sharp-{steps}"), SOURCE_WITH_BLANKS, steps=steps)
        return built[steps]

    return get
