"""The command line: parse, load config, call the stage, print the result.

Heavy libraries (torch, transformers, datasets) are imported inside the stages so that
`llmctl --help` answers at once. One boundary, `_guard`, maps `LlmctlError` to exit codes.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Optional

import typer

from llmctl import console as _console
from llmctl.errors import ConfigError, Interrupted, LlmctlError

app = typer.Typer(
    name="llmctl",
    help="Develop language models from the shell: prepare -> train -> eval / generate / export -> serve.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish, PowerShell
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
def _version(value: bool) -> None:
    if value:
        from llmctl import __version__

        typer.echo(f"llmctl {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", "-V", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Develop language models from the shell: prepare -> train -> eval / generate / export -> serve."""


config_app = typer.Typer(help="Show or check a config.", no_args_is_help=True)
app.add_typer(config_app, name="config")
launch_app = typer.Typer(help="Scripts that launch training on a cluster.", no_args_is_help=True)
app.add_typer(launch_app, name="launch")

PIPELINE = ("prepare", "train", "eval", "generate", "export")
# stage name -> module under llmctl.stages
MODULES = {
    "prepare": "prepare",
    "train": "train",
    "eval": "evaluate",
    "generate": "generate",
    "export": "export",
    "serve": "serve",
    "explain": "explain",
    "distill": "distill",
}

# Shared options ---------------------------------------------------------------------
ConfigArg = typer.Argument(..., help="Experiment YAML file.", metavar="CONFIG")
SetOpt = typer.Option(None, "--set", "-s", help="Override a key: --set train.lr=1e-3 (value parsed as YAML). Repeatable.")
RunDirOpt = typer.Option(None, "--run-dir", help="Run directory (default: run.dir or runs/<run.name>).")
ForceOpt = typer.Option(False, "--force", help="Redo the stage even if it is complete and up to date.")
JsonOpt = typer.Option(False, "--json", help="Print the result as one JSON object on stdout; human output on stderr.")
NprocOpt = typer.Option(None, "--nproc", help="Launch N processes with torchrun (DDP/FSDP).")
QuietOpt = typer.Option(False, "--quiet", "-q", help="Only errors on stderr.")
# Several nodes: torchrun's own rendezvous, passed through (llmctl.train.launch.Nodes checks them).
NnodesOpt = typer.Option(None, "--nnodes", help="Nodes in the job (torchrun --nnodes); each node runs this command with --nproc ranks.", rich_help_panel="Nodes")
NodeRankOpt = typer.Option(None, "--node-rank", help="This node's rank, 0..N-1 (static rendezvous; torchrun restarts reliably with it).", rich_help_panel="Nodes")
MasterAddrOpt = typer.Option(None, "--master-addr", help="Node 0's address (static rendezvous).", rich_help_panel="Nodes")
MasterPortOpt = typer.Option(None, "--master-port", help="Node 0's port (default 29500).", rich_help_panel="Nodes")
RdzvEndpointOpt = typer.Option(None, "--rdzv-endpoint", help="HOST:PORT of torchrun's c10d rendezvous (instead of --node-rank/--master-addr).", rich_help_panel="Nodes")
RdzvIdOpt = typer.Option(None, "--rdzv-id", help="The job's id for the c10d rendezvous (the same on every node).", rich_help_panel="Nodes")
DetachOpt = typer.Option(False, "--detach", help="Run in the background, immune to SSH hang-ups; output to RUN/logs/ (follow: llmctl logs RUN -f, stop: llmctl stop RUN).")
QuantizeOpt = typer.Option(None, "--quantize", help="none, int8 or int4: quantize the model after loading, for CPU inference (same as --set SECTION.quantize=...).")


def _with_quantize(overrides: Optional[List[str]], section: str, quantize: Optional[str]) -> Optional[List[str]]:
    """--quantize X is --set SECTION.quantize=X (validated, hashed and saved like any key)."""
    return list(overrides or []) + ([f"{section}.quantize={quantize}"] if quantize is not None else [])


def _setup_env() -> None:
    # Library progress bars and chatter would drown our own output.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # plain tqdm bars (transformers' GGUF reader)
    # transformers imports torchao whenever it is installed (the quant extra): its import logs
    # that two CUDA-only libraries do not load, and torch's pytree logs deprecations. Not ours.
    import logging

    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)


def _silence_warnings() -> None:
    """-q: only errors. Python warnings and library log records below ERROR are dropped too."""
    import logging
    import warnings

    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    os.environ["PYTHONWARNINGS"] = "ignore"  # torchrun's ranks and other children
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"


def _raise_interrupted(signum: int, frame: object) -> None:
    raise Interrupted(signum)


@contextmanager
def _guard(json_mode: bool = False, quiet: bool = False, reports: bool = True) -> Iterator[_console.Console]:
    """The one error boundary: user errors -> one line + exit code; bugs keep tracebacks.

    With --json it also writes the one JSON object on stdout, whatever the exit code (`ok`,
    `exit_code`, `error`, `hint`, and the result or what was measured before the failure).
    `reports=False` (a torchrun rank): the launcher reports the interruption and the result.
    """
    _setup_env()
    con = _console.Console(json_mode=json_mode, quiet=quiet)
    _console.set_current(con)
    if quiet:
        _silence_warnings()
    signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        yield con
    except KeyboardInterrupt:
        _fail(con, Interrupted(signal.SIGINT), reports)
    except LlmctlError as e:
        _fail(con, e, reports)
    except (typer.Exit, SystemExit):
        raise  # an exit code chosen on purpose (no command raises one inside the boundary today)
    except Exception as e:
        if reports:
            con.emit_json(1, error=f"{type(e).__name__}: {e}")
        raise  # a bug: its traceback is the report
    if reports:
        con.emit_json(0)


def _fail(con: _console.Console, e: LlmctlError, reports: bool) -> None:
    if reports or not isinstance(e, Interrupted):  # a rank's interruption is reported once, by its launcher
        con.error(str(e))
    if reports:
        con.emit_json(e.exit_code, error=str(e), hint=e.hint, partial=e.result)
    raise typer.Exit(e.exit_code) from None


def _load(config: str, overrides: Optional[List[str]], fetch: bool = False):
    """The validated config; combinations no stage can carry out are refused here (exit 2).

    `fetch` lets the check download a hub model's config.json (prepare, train, run, validate).
    """
    from llmctl.checks import check
    from llmctl.config import load_config

    cfg = load_config(config, overrides or [])
    check(cfg, fetch=fetch)
    return cfg


def _rundir(cfg, run_dir: Optional[str]):
    from llmctl.rundir import RunDir

    return RunDir.for_config(cfg, run_dir)


def _stage(name: str):
    return importlib.import_module(f"llmctl.stages.{MODULES[name]}")


def _reporter() -> tuple[bool, bool]:
    """(this process talks, this process reports the result and an interruption).

    Under torchrun only rank 0 talks (errors always print). Started by `train --nproc`,
    even rank 0 leaves the result to its launcher, so `--json` gives one object and the
    summary table shows once.
    """
    if os.environ.get("LLMCTL_SUPERVISED") == "1":  # train.max_restarts' child: its supervisor reports
        return True, False
    if "LOCAL_RANK" not in os.environ:
        return True, True
    rank0 = int(os.environ.get("RANK", "0")) == 0
    return rank0, rank0 and os.environ.get("LLMCTL_TORCHRUN") != "1"


def _run_stage(name: str, config: str, overrides, run_dir, force: bool, json_mode: bool, quiet: bool, detach: bool = False, **opts) -> None:
    talks, reports = _reporter()
    with _guard(json_mode, quiet or not talks, reports=reports) as con:
        cfg = _load(config, overrides, fetch=name in ("prepare", "train"))
        rd = _rundir(cfg, run_dir)
        if detach:
            return _detach(con, name, rd)
        result = _stage(name).run(cfg, rd, force=force, **opts)
        if result is not None and reports:
            con.result(result, title=f"{name}: {rd.root}")


def _detach(con, name: str, rd) -> None:
    """--detach: the same command line in its own session; what to type next."""
    from llmctl.detach import spawn

    res = spawn(rd, name, sys.argv[1:])
    con.result(res, title=f"{name}: detached (pid {res['pid']}), output in {res['log']}")


# Stage commands ---------------------------------------------------------------------
@app.command()
def prepare(
    config: str = ConfigArg,
    set_: Optional[List[str]] = SetOpt,
    run_dir: Optional[str] = RunDirOpt,
    force: bool = ForceOpt,
    json_: bool = JsonOpt,
    quiet: bool = QuietOpt,
    detach: bool = DetachOpt,
) -> None:
    """Build the tokenizer and the tokenized, split dataset in RUN/prepare."""
    _run_stage("prepare", config, set_, run_dir, force, json_, quiet, detach)


@app.command()
def train(
    config: str = ConfigArg,
    set_: Optional[List[str]] = SetOpt,
    run_dir: Optional[str] = RunDirOpt,
    force: bool = ForceOpt,
    nproc: Optional[int] = NprocOpt,
    nnodes: Optional[int] = NnodesOpt,
    node_rank: Optional[int] = NodeRankOpt,
    master_addr: Optional[str] = MasterAddrOpt,
    master_port: Optional[int] = MasterPortOpt,
    rdzv_endpoint: Optional[str] = RdzvEndpointOpt,
    rdzv_id: Optional[str] = RdzvIdOpt,
    json_: bool = JsonOpt,
    quiet: bool = QuietOpt,
    detach: bool = DetachOpt,
) -> None:
    """Train from scratch or fine-tune; resumes automatically from the last checkpoint."""
    _run_stage("train", config, set_, run_dir, force, json_, quiet, detach, nproc=nproc,
               nodes=dict(nnodes=nnodes, node_rank=node_rank, master_addr=master_addr, master_port=master_port, rdzv_endpoint=rdzv_endpoint, rdzv_id=rdzv_id))


@app.command()
def distill(
    config: str = ConfigArg,
    set_: Optional[List[str]] = SetOpt,
    run_dir: Optional[str] = RunDirOpt,
    force: bool = ForceOpt,
    nproc: Optional[int] = NprocOpt,
    nnodes: Optional[int] = NnodesOpt,
    node_rank: Optional[int] = NodeRankOpt,
    master_addr: Optional[str] = MasterAddrOpt,
    master_port: Optional[int] = MasterPortOpt,
    rdzv_endpoint: Optional[str] = RdzvEndpointOpt,
    rdzv_id: Optional[str] = RdzvIdOpt,
    json_: bool = JsonOpt,
    quiet: bool = QuietOpt,
    detach: bool = DetachOpt,
) -> None:
    """Train a student on a teacher's logits (distill section) into RUN/train; resumes like train."""
    _run_stage("distill", config, set_, run_dir, force, json_, quiet, detach, nproc=nproc,
               nodes=dict(nnodes=nnodes, node_rank=node_rank, master_addr=master_addr, master_port=master_port, rdzv_endpoint=rdzv_endpoint, rdzv_id=rdzv_id))


@app.command("eval")
def eval_(
    config: str = ConfigArg,
    set_: Optional[List[str]] = SetOpt,
    run_dir: Optional[str] = RunDirOpt,
    force: bool = ForceOpt,
    model: Optional[str] = typer.Option(None, "--model", help="Evaluate this model (hub id, HF dir, or a .gguf file) instead of RUN/train/model."),
    quantize: Optional[str] = QuantizeOpt,
    json_: bool = JsonOpt,
    quiet: bool = QuietOpt,
    detach: bool = DetachOpt,
) -> None:
    """Perplexity on held-out text, BLEU/chrF/TER on prompt/completion pairs; thresholds exit 4."""
    _run_stage("eval", config, _with_quantize(set_, "eval", quantize), run_dir, force, json_, quiet, detach, model=model)


@app.command()
def generate(
    config: str = ConfigArg,
    set_: Optional[List[str]] = SetOpt,
    run_dir: Optional[str] = RunDirOpt,
    model: Optional[str] = typer.Option(None, "--model", help="Generate with this model (hub id or dir) instead of RUN/train/model."),
    prompt: Optional[List[str]] = typer.Option(None, "--prompt", "-p", help="A prompt. Repeatable. '-' reads prompts from stdin."),
    prompts_file: Optional[str] = typer.Option(None, "--prompts-file", help=".txt (one per line) or .jsonl (prompt or messages)."),
    logprobs: Optional[int] = typer.Option(None, "--logprobs", min=0, max=20, help="Record each token's logprob, entropy and the top K alternatives in outputs.jsonl."),
    surprisal: bool = typer.Option(False, "--surprisal", help="Show outputs coloured by each token's surprisal (implies --logprobs 0)."),
    quantize: Optional[str] = QuantizeOpt,
    json_: bool = JsonOpt,
    quiet: bool = QuietOpt,
    raw: bool = typer.Option(False, "--raw", help="Send plain prompts as they are, even when data.format is chat (default: as a user turn through the chat template)."),
    image: Optional[List[str]] = typer.Option(None, "--image", help="An image for an image-text model, paired in order with --prompt (or one prompt for all). Repeatable."),
) -> None:
    """Generate text from prompts (command line, file or stdin); results to RUN/generate/outputs.jsonl."""
    _run_stage("generate", config, _with_quantize(set_, "generate", quantize), run_dir, True, json_, quiet, model=model, prompts=prompt or [], prompts_file=prompts_file, logprobs=logprobs, surprisal=surprisal, raw=raw, images=image or [])


@app.command()
def explain(
    config: str = ConfigArg,
    prompt: str = typer.Option(..., "--prompt", "-p", help="The prompt to explain."),
    target: Optional[str] = typer.Option(None, "--target", "-t", help="Explain this continuation instead of the greedy next token."),
    top_k: int = typer.Option(5, "--top-k", help="Next-token alternatives to list."),
    attention: bool = typer.Option(False, "--attention", help="Also report attention weights (switches to the eager attention kernel)."),
    set_: Optional[List[str]] = SetOpt,
    run_dir: Optional[str] = RunDirOpt,
    model: Optional[str] = typer.Option(None, "--model", help="Explain this model (hub id or dir) instead of RUN/train/model."),
    json_: bool = JsonOpt,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No heatmap or other output on stderr, only errors (explain.json and explain.html are still written)."),
    raw: bool = typer.Option(False, "--raw", help="Explain the prompt as given, even when data.format is chat (default: as a user turn through the chat template, as generate sends it)."),
    image: Optional[str] = typer.Option(None, "--image", help="Image-text models: explain the caption of this image (patch saliency heatmap over it)."),
) -> None:
    """Which prompt tokens the next token depends on: saliency, logprobs, attention; heatmap + RUN/explain/explain.html."""
    _run_stage("explain", config, set_, run_dir, True, json_, quiet, model=model, prompt=prompt, target=target, top_k=top_k, attention=attention, raw=raw, image=image)


@app.command()
def export(
    config: str = ConfigArg,
    set_: Optional[List[str]] = SetOpt,
    run_dir: Optional[str] = RunDirOpt,
    force: bool = ForceOpt,
    format_: Optional[List[str]] = typer.Option(None, "--format", "-f", help="hf, onnx, gguf or hf-int8. Repeatable; overrides export.formats."),
    json_: bool = JsonOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Export the trained model (hf, onnx, gguf), verified against it and checksummed."""
    _run_stage("export", config, set_, run_dir, force, json_, quiet, formats=format_ or None)


@app.command()
def serve(
    config: str = ConfigArg,
    set_: Optional[List[str]] = SetOpt,
    run_dir: Optional[str] = RunDirOpt,
    model: Optional[str] = typer.Option(None, "--model", help="Serve this model dir or hub id."),
    host: Optional[str] = typer.Option(None, "--host", help="Bind address (default 127.0.0.1)."),
    port: Optional[int] = typer.Option(None, "--port", help="Port (default 8000)."),
    quantize: Optional[str] = QuantizeOpt,
    quiet: bool = QuietOpt,
    insecure: bool = typer.Option(False, "--insecure", help="Serve a non-loopback address without an API key (anyone who can reach it can use it)."),
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API."""
    _run_stage("serve", config, _with_quantize(set_, "serve", quantize), run_dir, False, False, quiet, model=model, host=host, port=port, insecure=insecure)


@app.command("run")
def run_all(
    config: str = ConfigArg,
    set_: Optional[List[str]] = SetOpt,
    run_dir: Optional[str] = RunDirOpt,
    from_: Optional[str] = typer.Option(None, "--from", help="First stage to run."),
    to: Optional[str] = typer.Option(None, "--to", help="Last stage to run."),
    json_: bool = JsonOpt,
    quiet: bool = QuietOpt,
    detach: bool = DetachOpt,
) -> None:
    """Run prepare, train, eval, generate, export in order, skipping stages already up to date."""
    with _guard(json_, quiet) as con:
        from llmctl.pipeline import run_pipeline

        cfg = _load(config, set_, fetch=True)
        rd = _rundir(cfg, run_dir)
        if detach:
            return _detach(con, "run", rd)
        result = run_pipeline(cfg, rd, _stage, PIPELINE, first=from_, last=to)
        con.result(result, title=f"run: {rd.root}")


@app.command()
def status(
    run_dir: str = typer.Argument(..., help="Run directory, or a config file (its run directory)."),
    set_: Optional[List[str]] = SetOpt,
    json_: bool = JsonOpt,
) -> None:
    """Each stage of a run: state, when, headline numbers."""
    with _guard(json_) as con:
        from llmctl.rundir import RunDir

        cfg = None  # a run directory: each stage is compared with the config it recorded
        if Path(run_dir).is_file():
            cfg = _load(run_dir, set_)
            rd = RunDir.for_config(cfg)
        else:
            rd = RunDir(run_dir)
            if not rd.root.is_dir():
                raise ConfigError(f"{run_dir}: no such run directory")
        rows = rd.status(cfg, overrides=set_ or ())
        from llmctl.detach import annotate

        annotate(rd, rows)
        report = None
        if rd.report_path.is_file():
            import json

            report = json.loads(rd.report_path.read_text())
        if con.json_mode:
            con.result({"run_dir": str(rd.root), "stages": rows} | ({"curation": report} if report else {}))
            return
        for r in rows:
            h = r.get("headline") or {}
            r["headline"] = "  ".join(f"{k}={_console._fmt(v)}" for k, v in h.items())
            r["finished"] = r.get("finished_at") or ""
            if r.get("why"):
                r["headline"] = f"({r['why']}) " + r["headline"]
        con.table(rows, ["stage", "status", "finished", "headline"], title=str(rd.root))
        if report:
            from llmctl.data.curate import summary_lines

            for line in summary_lines(report):
                con.info(line)


def _existing_run(run_dir: str):
    from llmctl.rundir import RunDir

    rd = RunDir(run_dir)
    if not rd.root.is_dir():
        raise ConfigError(f"{run_dir}: no such run directory")
    return rd


@app.command()
def logs(
    run_dir: str = typer.Argument(..., help="Run directory."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing until the detached stage ends."),
    stage: Optional[str] = typer.Option(None, "--stage", help="Which log: prepare, train, distill, eval or run (default: the newest)."),
) -> None:
    """Print a detached stage's log (RUN/logs/STAGE.log); -f follows it."""
    with _guard() as con:
        from llmctl import detach

        rd = _existing_run(run_dir)
        path = detach.pick_log(rd, stage)
        rec = detach.follow(path, lambda: detach.read_record(rd, path.stem), sys.stdout, follow)
        if follow and rec and rec.get("exit_code") is not None:
            con.info(f"{path.stem} exited with {rec['exit_code']}")


@app.command()
def stop(
    run_dir: str = typer.Argument(..., help="Run directory."),
    stage: Optional[str] = typer.Option(None, "--stage", help="Only this detached command (default: whatever runs)."),
    now: bool = typer.Option(False, "--now", help="SIGKILL at once, without a checkpoint (resumes from the last one)."),
    timeout: float = typer.Option(600.0, "--timeout", help="Seconds to wait for the checkpoint before giving up."),
    json_: bool = JsonOpt,
) -> None:
    """Stop a running stage: SIGTERM, wait for its checkpoint (exit 143 recorded); --now kills it."""
    with _guard(json_) as con:
        from llmctl import detach

        rd = _existing_run(run_dir)
        con.result(detach.stop(rd, stage, now, timeout, con.info), title=f"stopped: {rd.root}")


@launch_app.command("slurm")
def launch_slurm(
    config: str = ConfigArg,
    nodes: int = typer.Option(..., "--nodes", help="Nodes (one srun task each)."),
    gpus_per_node: int = typer.Option(..., "--gpus-per-node", help="GPUs per node: one rank each (--nproc)."),
    time: Optional[str] = typer.Option(None, "--time", help="Slurm time limit, e.g. 12:00:00."),
    partition: Optional[str] = typer.Option(None, "--partition", help="Slurm partition."),
    account: Optional[str] = typer.Option(None, "--account", help="Slurm account."),
    master_port: int = typer.Option(29500, "--master-port", help="Rendezvous port on the first node."),
    set_: Optional[List[str]] = SetOpt,
    run_dir: Optional[str] = RunDirOpt,
) -> None:
    """Print an sbatch script that trains CONFIG on N nodes (torchrun rendezvous on the first; requeued after SIGTERM)."""
    with _guard():
        from llmctl.launch_slurm import sbatch_script

        cfg = _load(config, set_)
        sys.stdout.write(sbatch_script(cfg, _rundir(cfg, run_dir).root, nodes=nodes, gpus_per_node=gpus_per_node, time=time,
                                       partition=partition, account=account, port=master_port))


@app.command()
def report(
    target: str = typer.Argument(..., help="A config file (its run directory) or a run directory.", metavar="CONFIG|RUN"),
    set_: Optional[List[str]] = SetOpt,
    run_dir: Optional[str] = RunDirOpt,
    json_: bool = JsonOpt,
) -> None:
    """Write RUN/report.html: one self-contained page (curves, data, eval, samples, exports, lineage)."""
    with _guard(json_) as con:
        from llmctl.report import write
        from llmctl.rundir import RunDir

        cfg = _load(target, set_) if Path(target).is_file() else None
        if cfg is None and set_:
            raise ConfigError("report: --set applies to a CONFIG argument; this is a run directory")
        rd = _rundir(cfg, run_dir) if cfg is not None else RunDir(run_dir or target)
        if not rd.root.is_dir():
            raise ConfigError(f"{rd.root}: no such run directory (give a run directory or the config that made it)")
        con.result(write(rd, cfg), title=f"report: {rd.root}")


@config_app.command("show")
def config_show(
    config: Optional[str] = typer.Argument(None, help="Experiment YAML file (omit with --doc)."),
    set_: Optional[List[str]] = SetOpt,
    doc: bool = typer.Option(False, "--doc", help="Print the reference of every key (Markdown)."),
    json_: bool = JsonOpt,
) -> None:
    """Print the resolved config: defaults filled in, overrides applied."""
    with _guard(json_ and not doc) as con:
        from llmctl.config import config_doc, config_to_yaml

        if doc:
            sys.stdout.write(config_doc())
            return
        if config is None:
            raise ConfigError("config show: give a CONFIG file, or --doc for the key reference")
        cfg = _load(config, set_)
        if json_:
            con.result(cfg.model_dump(mode="json"))  # the sections, beside ok and exit_code
        else:
            sys.stdout.write(config_to_yaml(cfg))


@config_app.command("validate")
def config_validate(
    config: str = ConfigArg,
    set_: Optional[List[str]] = SetOpt,
) -> None:
    """Check a config without running anything (exit 2 with the key and the fix if it is wrong; warnings for likely mistakes)."""
    with _guard() as con:
        from llmctl.checks import footguns

        warnings = footguns(_load(config, set_, fetch=True))
        for w in warnings:
            con.warn(w)
        con.info(f"{config}: ok" + (f" ({len(warnings)} warning{'s' * (len(warnings) > 1)})" if warnings else ""))


def main() -> None:
    from llmctl.detach import ENV, recording_exit

    with recording_exit(os.environ.pop(ENV, None)):  # a detached process records its exit code
        _main_cli()


def _main_cli() -> None:
    if "--json" not in sys.argv[1:]:
        app(prog_name="llmctl")  # the same name (and completion script) under `python -m llmctl`
        return
    # --json: a command-line mistake (an unknown option, a missing CONFIG; exit 2) is reported as
    # the one JSON object too. Errors past parsing are `_guard`'s, which returns their exit code.
    # (click's exception classes, from click itself or from the copy newer typer versions carry)
    click_error = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
    try:
        code = app(prog_name="llmctl", standalone_mode=False)
    except click_error as e:
        e.show()
        _console.Console(json_mode=True).emit_json(e.exit_code, error=e.format_message())
        sys.exit(e.exit_code)
    except RuntimeError as e:
        if type(e).__name__ != "Abort":  # Ctrl-C at a prompt
            raise
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
