"""The CLI shell: help, start-up cost, exit codes, status, --json."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO, invoke_cli, run_cli, tiny_config_dict, write_config
from llmctl.config import load_config
from llmctl.rundir import RunDir


def test_help_lists_every_stage():
    r = run_cli("--help")
    assert r.returncode == 0
    for cmd in ("prepare", "train", "eval", "generate", "export", "serve", "run", "status", "config"):
        assert cmd in r.stdout


def test_startup_imports_no_heavy_library():
    code = (
        "import sys, llmctl.cli\n"
        "heavy = [m for m in ('torch', 'transformers', 'datasets', 'accelerate', 'peft') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0 and r.stdout.strip() == "", r.stdout


def test_stage_help_is_cheap():
    """Every command's --help answers without importing a heavy library (the cost that counts:
    torch alone takes seconds to import), all in one process."""
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from llmctl.cli import app\n"
        "for cmd in sys.argv[1:]:\n"
        "    r = CliRunner().invoke(app, cmd.split() + ['--help'])\n"
        "    assert r.exit_code == 0 and 'Usage' in r.stdout, (cmd, r.stdout)\n"
        "heavy = [m for m in ('torch', 'transformers', 'datasets', 'accelerate', 'peft', 'fastapi', 'sacrebleu') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    cmds = ["prepare", "train", "distill", "eval", "generate", "explain", "export", "serve", "run", "status", "logs", "stop", "config show", "config validate"]
    r = subprocess.run([sys.executable, "-c", code, *cmds], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", f"--help imported {r.stdout.strip()}"


def test_config_error_exit_2_one_line(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  max_stepz: 3\n")
    r = run_cli("prepare", str(p))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert "c.yaml:2" in lines[0] and "train.max_stepz" in lines[0] and "train.max_steps" in lines[0]  # where, what, the fix


def test_missing_input_exit_3(tmp_path):
    p = write_config(tmp_path / "c.yaml", tiny_config_dict(tmp_path / "run"))
    r = invoke_cli("eval", str(p))
    assert r.returncode == 3
    assert "run 'llmctl train" in r.stderr or "run 'llmctl prepare" in r.stderr


def test_status_table_and_json(tmp_path):
    p = write_config(tmp_path / "c.yaml", tiny_config_dict(tmp_path / "run"))
    cfg = load_config(p)
    rd = RunDir(tmp_path / "run")
    with rd.begin("prepare", cfg) as st:
        st.headline["documents"] = 12
    r = invoke_cli("status", str(tmp_path / "run"), "--json")
    assert r.returncode == 0
    data = json.loads(r.stdout)
    stages = {s["stage"]: s for s in data["stages"]}
    assert stages["prepare"]["status"] == "complete" and stages["prepare"]["headline"]["documents"] == 12
    assert stages["train"]["status"] == "missing"
    r = invoke_cli("status", str(tmp_path / "run"))
    assert r.returncode == 0 and "prepare" in r.stderr and "documents=12" in r.stderr
    r = invoke_cli("status", str(tmp_path / "nope"))
    assert r.returncode == 2


def test_run_rejects_unknown_stage_range(tmp_path):
    p = write_config(tmp_path / "c.yaml", tiny_config_dict(tmp_path / "run"))
    r = invoke_cli("run", str(p), "--from", "trian")
    assert r.returncode == 2 and "--from" in r.stderr


def test_version():
    from llmctl import __version__

    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"llmctl {__version__}"


def test_shell_completion_is_on():
    # `--show-completion` detects the shell from the parent process (sh under CI); ask for bash
    # the way the installed script itself does, through the completion variable.
    r = run_cli(env={"_LLMCTL_COMPLETE": "source_bash"})
    assert r.returncode == 0 and "complete -o default -F _llmctl_completion llmctl" in r.stdout
    r = run_cli(env={"_LLMCTL_COMPLETE": "complete_bash", "COMP_WORDS": "llmctl tr", "COMP_CWORD": "1"})
    assert r.returncode == 0 and r.stdout.split() == ["train"]
