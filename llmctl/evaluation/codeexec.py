"""Code generation: run sampled completions against unit tests in a sandbox, report pass@k.

The shipped set (llmctl/data/code_tasks_train.jsonl, code_tasks_test.jsonl) is 24 short
stdlib-flavoured functions written for llmctl; a fine-tune can train on its train file. A task
is one JSONL row: `task_id`, `prompt` (a signature and docstring), `entry_point`,
`tests` (Python asserts that call it), optionally `canonical_solution` and `split`. The program
run for a sample is prompt + completion + tests.

Each sample runs in its own process (`python -I` on a small runner, below) with:
- a fresh temporary directory as its working directory and HOME, and a stripped environment;
- wall-clock timeout (the process group is killed) and RLIMIT_CPU at the same number of seconds;
- RLIMIT_AS (memory), RLIMIT_FSIZE, RLIMIT_NOFILE, no core files;
- new network and PID namespaces (unshare; a user namespace too when not root): no network
  but a loopback that is down, and every process the sample forks dies with it;
- RLIMIT_NPROC, which binds only a non-root user: as root the sample runs as `nobody` when the
  interpreter's standard library is readable to it; where it is not (a Python under /root), it
  stays root and process creation is refused in Python instead (os.fork, subprocess, ctypes...:
  a guard, not a wall; the PID namespace and the timeout still end whatever gets past it);
- Landlock (Linux 5.13+): writing, creating or removing files anywhere but the temporary
  directory is refused by the kernel, reads stay allowed (the standard library must import).
A layer the kernel does not offer is reported in `isolation` (and warned about), not faked.

Outcomes: pass (exit 0), fail (an AssertionError: a test failed), error (any other exception,
a syntax error, a sandbox refusal such as MemoryError or PermissionError), timeout.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from llmctl.data.jsonl import read_jsonl
from llmctl.errors import DataError

OUTCOMES = ("pass", "fail", "timeout", "error")
# A completion ends where the next top-level statement begins (HumanEval's convention).
STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\nassert ", "\n#")
NOBODY = 65534

RUNNER = r'''
import ctypes, json, os, resource, sys, traceback
cfg = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWUSER, CLONE_NEWNET, CLONE_NEWPID = 0x10000000, 0x40000000, 0x20000000
got = {}
flags = CLONE_NEWNET | CLONE_NEWPID | (0 if os.geteuid() == 0 else CLONE_NEWUSER)
got["namespaces"] = libc.unshare(flags) == 0
if got["namespaces"]:
    pid = os.fork()  # the first child is PID 1 of the new namespace: when it ends, every process it forked ends too
    if pid:
        _, status = os.waitpid(pid, 0)
        os._exit(os.waitstatus_to_exitcode(status) % 256 if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))
mem = cfg["memory_mb"] * 2**20
for lim, v in ((resource.RLIMIT_AS, mem), (resource.RLIMIT_CPU, cfg["cpu_s"]), (resource.RLIMIT_FSIZE, 16 * 2**20),
               (resource.RLIMIT_NOFILE, 64), (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(lim, (v, v))
def world_readable(path):
    while True:
        if os.stat(path).st_mode & 0o005 != 0o005:
            return False
        if path == os.path.dirname(path):
            return True
        path = os.path.dirname(path)
if os.geteuid() == 0 and world_readable(os.path.dirname(os.__file__)):
    os.setgroups([]); os.setgid(cfg["uid"]); os.setuid(cfg["uid"])  # RLIMIT_NPROC binds only a non-root user
got["nproc"] = os.geteuid() != 0
resource.setrlimit(resource.RLIMIT_NPROC, (cfg["nproc"], cfg["nproc"]))
if not got["nproc"]:  # root (its standard library unreadable to nobody): no process may be started from Python
    def refuse(*a, **k):
        raise PermissionError("starting processes is disabled in the llmctl sandbox")
    for name in ("fork", "forkpty", "system", "popen", "posix_spawn", "posix_spawnp", "execv", "execve", "execvp", "execvpe",
                 "execl", "execle", "execlp", "execlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe", "spawnl", "spawnle", "kill", "killpg"):
        if hasattr(os, name):
            setattr(os, name, refuse)
    for name in ("subprocess", "_posixsubprocess", "multiprocessing", "ctypes", "_ctypes", "pty"):
        sys.modules[name] = None
    got["fork_guard"] = "python"
libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS: required by Landlock
abi = libc.syscall(444, None, 0, 1)  # landlock_create_ruleset(NULL, 0, VERSION)
got["landlock"] = False
if abi >= 1:
    write = (1 << 1) | sum(1 << b for b in range(4, 13)) | ((1 << 13) if abi >= 2 else 0) | ((1 << 14) if abi >= 3 else 0)
    attr = ctypes.c_uint64(write)
    fd = libc.syscall(444, ctypes.byref(attr), 8, 0)
    tmp = os.open(cfg["tmp"], os.O_PATH | os.O_DIRECTORY)
    rule = ctypes.create_string_buffer(write.to_bytes(8, "little") + tmp.to_bytes(4, "little", signed=True), 12)
    ok = fd >= 0 and libc.syscall(445, fd, 1, rule, 0) == 0 and libc.syscall(446, fd, 0) == 0
    got["landlock"] = bool(ok)
if cfg.get("report"):
    print(json.dumps(got)); sys.stdout.flush(); os._exit(0)
src = open("program.py", encoding="utf-8").read()
try:
    exec(compile(src, "program.py", "exec"), {"__name__": "__main__"})
except AssertionError:
    traceback.print_exc(limit=-1); os._exit(1)
except BaseException:
    traceback.print_exc(limit=-1); os._exit(2)
os._exit(0)
'''


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimator of Chen et al. (2021): 1 - C(n-c, k) / C(n, k), computed stably."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def _env(tmp: str) -> dict:
    return {"PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"}


def _launch(tmp: str, timeout: float, memory_mb: int, nproc: int, report: bool = False) -> subprocess.CompletedProcess | None:
    cfg = {"memory_mb": memory_mb, "cpu_s": max(1, math.ceil(timeout)), "uid": NOBODY, "nproc": nproc, "tmp": tmp, "report": report}
    proc = subprocess.Popen([sys.executable, "-I", "-c", RUNNER, json.dumps(cfg)], cwd=tmp, env=_env(tmp), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    except subprocess.TimeoutExpired:
        return None
    finally:
        try:  # whatever the sample left behind in its session goes too
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.communicate()


def _tempdir() -> str:
    tmp = tempfile.mkdtemp(prefix="llmctl-code-")
    if os.geteuid() == 0:
        os.chown(tmp, NOBODY, NOBODY)  # the sample runs as nobody: its one writable place
    return tmp


def isolation(memory_mb: int = 256) -> dict:
    """Which sandbox layers this machine gives a sample (namespaces, nproc, landlock)."""
    import shutil

    tmp = _tempdir()
    try:
        r = _launch(tmp, 30, memory_mb, 64, report=True)
        return json.loads(r.stdout) if r and r.returncode == 0 and r.stdout.strip() else {"namespaces": False, "nproc": False, "landlock": False}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_sample(program: str, timeout: float, memory_mb: int, nproc: int = 16) -> dict:
    """One program in the sandbox: {outcome, detail}."""
    import shutil

    tmp = _tempdir()
    try:
        p = Path(tmp) / "program.py"
        p.write_text(program, encoding="utf-8")
        os.chmod(p, 0o444)
        r = _launch(tmp, timeout, memory_mb, nproc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if r is None:
        return {"outcome": "timeout", "detail": f"over {timeout} s"}
    last = (r.stderr.strip().splitlines() or [""])[-1][:300]
    if r.returncode == 0:
        return {"outcome": "pass", "detail": ""}
    if r.returncode == 1:
        return {"outcome": "fail", "detail": last or "AssertionError"}
    if r.returncode in (-signal.SIGXCPU, 128 + signal.SIGXCPU, -signal.SIGKILL, 128 + signal.SIGKILL):
        return {"outcome": "timeout", "detail": "CPU time limit"}
    return {"outcome": "error", "detail": last or f"exit {r.returncode}"}


SHIPPED = Path(__file__).resolve().parents[1] / "data"


def _read_tasks(f: Path) -> list[dict]:
    if not f.is_file():
        raise DataError(f"eval.code.path: {f} does not exist")
    tasks = []
    for i, row in read_jsonl(f):
        if not isinstance(row, dict):
            raise DataError(f"{f}:{i}: expected a JSON object (task_id, prompt, entry_point, tests)")
        missing = [k for k in ("task_id", "prompt", "entry_point", "tests") if not isinstance(row.get(k), str) or not row[k]]
        if missing:
            raise DataError(f"{f}:{i}: missing {', '.join(missing)} (a code task has task_id, prompt, entry_point, tests)")
        tasks.append(row)
    return tasks


def load_tasks(path: str | None, split: str) -> list[dict]:
    """The shipped task set (llmctl/data/code_tasks_{train,test}.jsonl; `split` picks) or a user
    file, one task a line (its rows' `split` field picks; a row without one is a test task)."""
    if path is None:
        return [t for sp in ("train", "test") if split in (sp, "all") for t in _read_tasks(SHIPPED / f"code_tasks_{sp}.jsonl")]
    tasks = [t for t in _read_tasks(Path(path)) if split == "all" or t.get("split", "test") == split]
    if not tasks:
        raise DataError(f"{path}: no tasks with split={split}: set eval.code.split (train, test or all)")
    return tasks


def program(task: dict, completion: str) -> str:
    return f"{task['prompt']}{completion}\n\n{task['tests']}\n"


def truncate(completion: str) -> str:
    """The completion up to the first top-level statement after the function body."""
    cut = min((i for i in (completion.find(s) for s in STOPS) if i >= 0), default=len(completion))
    return completion[:cut]


def execute_all(jobs: list[tuple[int, str]], timeout: float, memory_mb: int, workers: int, progress=None) -> dict[int, dict]:
    """Run each (key, program) in the sandbox, `workers` at a time."""
    from concurrent.futures import ThreadPoolExecutor

    nproc = 4 * workers + 8  # nobody's process budget, shared by the samples running at once
    out: dict[int, dict] = {}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for key, res in zip([k for k, _ in jobs], pool.map(lambda j: run_sample(j[1], timeout, memory_mb, nproc), jobs)):
            out[key] = res
            if progress is not None:
                progress.update(advance=1)
    return out


def summarize(tasks: list[dict], outcomes: dict[str, list[str]], n: int) -> dict:
    """pass@k (k in 1, 5, 10 where k <= n, as a fraction), outcome counts, per-task passes."""
    counts = {o: sum(v.count(o) for v in outcomes.values()) for o in OUTCOMES}
    out: dict = {"tasks": len(tasks), "samples_per_task": n, "outcomes": counts}
    for k in (1, 5, 10):
        if k <= n:
            out[f"pass@{k}"] = round(sum(pass_at_k(n, v.count("pass"), k) for v in outcomes.values()) / max(len(outcomes), 1), 4)
    out["per_task"] = {t: v.count("pass") for t, v in outcomes.items()}
    return out


def sample_completions(model, tok, tasks: list[dict], c, seed: int, batch_size: int, con=None) -> list[list[str]]:
    """`c.samples` completions per task (greedy when 1), cut at the next top-level statement."""
    from llmctl.generation import Sampling, generate_batch

    n = c.samples
    sp = Sampling(max_new_tokens=c.max_new_tokens, do_sample=n > 1, temperature=c.temperature, top_p=c.top_p, top_k=0,
                  stop=STOPS, num_return_sequences=n, seed=seed)
    per = max(1, batch_size // n)  # prompts per batch: each brings n rows
    out: list[list[str]] = []
    with (con.progress("sampling code", total=len(tasks), unit="tasks") if con else _null()) as prog:
        for i in range(0, len(tasks), per):
            chunk = tasks[i : i + per]
            res = generate_batch(model, tok, [t["prompt"] for t in chunk], sp)
            for j in range(len(chunk)):
                out.append([truncate(r["text"]) for r in res[j * n : (j + 1) * n]])
            if prog is not None:
                prog.update(advance=len(chunk))
    return out


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def evaluate(model, tok, c, seed: int, batch_size: int, con=None) -> tuple[dict, list[dict]]:
    """(summary: pass@k, outcome counts, isolation; one row per sample) for `eval.code`."""
    tasks = load_tasks(c.path, c.split)[: c.max_tasks]
    iso = isolation(c.memory_mb)
    weak = [k for k in ("namespaces", "landlock") if not iso.get(k)] + ([] if iso.get("nproc") or iso.get("fork_guard") else ["nproc"])
    if con is not None and weak:
        con.warn(f"code sandbox: this machine gives no {', '.join(weak)} (see llmctl/evaluation/codeexec.py): "
                 "the samples run with the other limits only")
    comps = sample_completions(model, tok, tasks, c, seed, batch_size, con)
    n = c.samples
    jobs = [(i * n + j, program(t, comp)) for i, (t, cs) in enumerate(zip(tasks, comps)) for j, comp in enumerate(cs)]
    if con is not None:
        con.step(f"running {len(jobs)} samples of {len(tasks)} code tasks in the sandbox ({c.timeout:g} s, {c.memory_mb} MiB each)")
    with (con.progress("executing", total=len(jobs), unit="samples") if con else _null()) as prog:
        results = execute_all(jobs, c.timeout, c.memory_mb, c.workers, prog)
    outcomes = {t["task_id"]: [results[i * n + j]["outcome"] for j in range(n)] for i, t in enumerate(tasks)}
    rows = [{"task_id": t["task_id"], "sample": j, "completion": comps[i][j], **results[i * n + j]}
            for i, t in enumerate(tasks) for j in range(n)]
    out = summarize(tasks, outcomes, n)
    out["isolation"] = iso
    out["source"] = c.path or f"builtin:code_tasks ({c.split})"
    out["split"] = c.split
    return out, rows
