"""`llmctl distill`: train a student against a teacher's logits, into RUN/train.

Training itself is `llmctl train`'s machinery in llmctl/train/ (checkpoints, exact resume,
SIGTERM, max_time, metrics, torchrun), given three hooks: the student (the model section, or
the teacher pruned by block influence), a Trainer whose `compute_loss` mixes KL to the teacher
with CE on the labels, and the teacher's identity, which goes into the manifest and the
staleness checks. It imports llmctl/train, not the train stage: stages never import each other.

    loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, labels)

summed over the positions the labels count and divided by the Trainer's `num_items_in_batch`,
so gradient accumulation and DDP give the losses of one big batch.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from llmctl import console as _console
from llmctl.errors import ConfigError, StageInputError
from llmctl.rundir import RunDir, model_hash, model_stat
from llmctl.train.build import Collator, device_and_dtype, load_splits
from llmctl.train.stage import Hooks, run as train_run


# --------------------------------------------------------------------------- the teacher
def resolve_teacher(spec: str) -> dict:
    """Where the teacher's weights are and who it is: {source, kind, path, run_dir?, run_id?}.

    kind is run (another llmctl run directory), dir (a Hugging Face model folder) or hub.
    """
    p = Path(spec).expanduser()
    if p.is_dir():
        if (p / "config.json").is_file():
            return {"source": spec, "kind": "dir", "path": str(p.resolve())}
        rd = RunDir(p)
        if rd.manifest("train") is not None or rd.stage_dir("prepare").is_dir() or rd.stage_dir("export").is_dir():
            m = rd.manifest("train")
            if m and m.get("status") == "complete" and (rd.model_dir / "config.json").is_file():
                path = rd.model_dir
            elif (rd.export_dir("hf") / "config.json").is_file() and (rd.manifest("export") or {}).get("status") == "complete":
                path = rd.export_dir("hf")
            else:
                state = (m or {}).get("status", "missing")
                raise StageInputError(f"distill.teacher: {p}/train is {state} and it has no export/hf: train the teacher first")
            return {"source": spec, "kind": "run", "path": str(path.resolve()), "run_dir": str(p.resolve()), "run_id": (m or {}).get("id")}
        raise ConfigError(f"distill.teacher: {spec} is a directory but neither a model (no config.json) nor a run directory (no train/)")
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1 or p.suffix in (".yaml", ".yml"):
        raise ConfigError(f"distill.teacher: {spec} does not exist: give a run directory, a model directory or a hub id")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(spec, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
    except Exception as e:  # offline, unknown repo, gated: one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise StageInputError(f"distill.teacher: '{spec}' is not a local directory, and fetching it from the hub failed: {first}") from None
    return {"source": spec, "kind": "hub", "path": str(Path(local).resolve()), "revision": Path(local).name}


def teacher_record(spec: str) -> dict:
    """The teacher's lineage for the student's manifest: where, which run, the weights' hash."""
    rec = resolve_teacher(spec)
    rec["model_hash"] = model_hash(rec["path"])
    rec["stat"] = model_stat(rec["path"])
    return rec


def teacher_identity(rec: dict) -> str:
    """What must not change under a student: the teacher's run and weights."""
    blob = json.dumps({k: rec.get(k) for k in ("run_id", "model_hash", "revision")}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def check_tokenizer(teacher_path: str, tokenizer_dir: Path, teacher_spec: str, prepare_cmd: str = "llmctl prepare CONFIG --force") -> None:
    """Teacher and student must mean the same thing by every token id (ConfigError, exit 2)."""
    from transformers import AutoTokenizer

    try:
        t_tok = AutoTokenizer.from_pretrained(teacher_path)
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"distill.teacher: {teacher_spec} has no loadable tokenizer to check against this run's: {first}") from None
    s_tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tv, sv = t_tok.get_vocab(), s_tok.get_vocab()
    fix = f"set tokenizer.name_or_path to the teacher ({teacher_path}) in the config and run '{prepare_cmd}'"
    if tv != sv:
        diff = sorted(set(tv.items()) ^ set(sv.items()), key=lambda kv: kv[1])[:3]
        raise ConfigError(
            f"distill.teacher: {teacher_spec}'s tokenizer differs from this run's ({len(tv)} vs {len(sv)} tokens; "
            f"first differences {[k for k, _ in diff]}): {fix}"
        )
    for name in ("bos_token_id", "eos_token_id"):
        a, b = getattr(t_tok, name), getattr(s_tok, name)
        if a is not None and b is not None and a != b:
            raise ConfigError(f"distill.teacher: {teacher_spec}'s {name} is {a}, this run's is {b}: {fix}")


def load_teacher(path: str, dtype, trust_remote_code: bool = False):
    """The teacher in eval mode, frozen: no gradients, never in the optimizer."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise StageInputError(f"distill.teacher: cannot load the model in {path}: {first}") from None
    model.eval()
    model.requires_grad_(False)
    return model


# --------------------------------------------------------------------------- pruning
def _decoder_layers(model):
    """(the module holding the layer list, its attribute name) for llama-style and gpt2 models."""
    base = model.base_model
    for attr in ("layers", "h"):
        if isinstance(getattr(base, attr, None), __import__("torch").nn.ModuleList):
            return base, attr
    raise ConfigError(f"distill.student_init=prune: cannot find the decoder layers of a {type(model).__name__} (llama-style and gpt2 models are supported)")


def _mlp_parts(layer):
    """(kind, mlp) with kind 'gated' (gate/up/down projections) or 'gpt2' (c_fc/c_proj)."""
    mlp = getattr(layer, "mlp", None)
    if mlp is not None and all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
        return "gated", mlp
    if mlp is not None and all(hasattr(mlp, n) for n in ("c_fc", "c_proj")):
        return "gpt2", mlp
    raise ConfigError(f"distill.mlp_size: cannot narrow the MLP of a {type(layer).__name__} (llama-style and gpt2 MLPs are supported)")


def calibration_batches(rd: RunDir, n_batches: int, batch_size: int, pad_id: int) -> list[dict]:
    """Held-out rows (the validation split, else the start of train) as model inputs."""
    train_ds, val_ds = load_splits(rd)
    split = val_ds if val_ds is not None else train_ds
    collate = Collator(pad_id)
    rows = min(len(split), n_batches * batch_size)
    return [collate([split[j] for j in range(i, min(i + batch_size, rows))]) for i in range(0, rows, batch_size)]


def measure(model, batches: list[dict], want_neurons: bool) -> tuple[list[float], list | None]:
    """Block influence per layer (ShortGPT: 1 - mean cosine(layer input, layer output) over
    real tokens) and, if asked, each MLP neuron's mean |activation| (Minitron's width criterion)."""
    import torch

    holder, attr = _decoder_layers(model)
    layers = getattr(holder, attr)
    n = len(layers)
    cos_sum = [0.0] * n
    count = [0] * n
    act_sum: list = [None] * n
    act_count = [0] * n
    mask_now: dict = {}
    hooks = []

    def pre(i):
        def hook(mod, args, kwargs):
            mask_now["x", i] = args[0] if args else kwargs["hidden_states"]

        return hook

    def post(i):
        def hook(mod, args, kwargs, out):
            x = mask_now.pop(("x", i))
            y = out[0] if isinstance(out, tuple) else out
            c = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)  # [B, S]
            m = mask_now["mask"]
            cos_sum[i] += float((c * m).sum())
            count[i] += int(m.sum())

        return hook

    def neuron(i):
        def hook(mod, args):
            a = args[0].float().abs() * mask_now["mask"].unsqueeze(-1)
            s = a.sum(dim=(0, 1))
            act_sum[i] = s if act_sum[i] is None else act_sum[i] + s
            act_count[i] += int(mask_now["mask"].sum())

        return hook

    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_pre_hook(pre(i), with_kwargs=True))
        hooks.append(layer.register_forward_hook(post(i), with_kwargs=True))
        if want_neurons:
            kind, mlp = _mlp_parts(layer)
            hooks.append((mlp.down_proj if kind == "gated" else mlp.c_proj).register_forward_pre_hook(neuron(i)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for b in batches:
                ids = b["input_ids"]
                mask_now["mask"] = b.get("attention_mask", torch.ones_like(ids)).float()
                model(input_ids=ids, attention_mask=b.get("attention_mask"))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    influence = [1.0 - cos_sum[i] / max(count[i], 1) for i in range(n)]
    neurons = [act_sum[i] / max(act_count[i], 1) for i in range(n)] if want_neurons else None
    return influence, neurons


def drop_layers(model, drop: list[int]) -> None:
    """Remove whole decoder layers and renumber what indexes them, so the KV cache (generate) works."""
    import torch

    holder, attr = _decoder_layers(model)
    layers = getattr(holder, attr)
    keep = [layer for i, layer in enumerate(layers) if i not in set(drop)]
    setattr(holder, attr, torch.nn.ModuleList(keep))
    for new_idx, layer in enumerate(keep):
        for mod in layer.modules():
            if hasattr(mod, "layer_idx"):
                mod.layer_idx = new_idx
    cfg = model.config
    types = getattr(cfg, "layer_types", None)
    if isinstance(types, list) and len(types) == len(layers):
        cfg.layer_types = [t for i, t in enumerate(types) if i not in set(drop)]
    cfg.num_hidden_layers = len(keep)


def narrow_mlp(model, size: int, importance: list) -> None:
    """Keep the `size` neurons of each MLP with the largest mean activation (in their original order)."""
    import torch

    holder, attr = _decoder_layers(model)
    for layer, imp in zip(getattr(holder, attr), importance):
        kind, mlp = _mlp_parts(layer)
        width = imp.numel()
        if size > width:
            raise ConfigError(f"distill.mlp_size ({size}) is wider than the teacher's MLP ({width}): choose at most {width}")
        idx = torch.sort(torch.topk(imp, size).indices).values
        with torch.no_grad():
            if kind == "gated":
                for lin in (mlp.gate_proj, mlp.up_proj):  # nn.Linear: rows are neurons
                    lin.weight = torch.nn.Parameter(lin.weight[idx].clone())
                    if lin.bias is not None:
                        lin.bias = torch.nn.Parameter(lin.bias[idx].clone())
                    lin.out_features = size
                mlp.down_proj.weight = torch.nn.Parameter(mlp.down_proj.weight[:, idx].clone())
                mlp.down_proj.in_features = size
            else:  # gpt2 Conv1D: weight is [in, out]
                mlp.c_fc.weight = torch.nn.Parameter(mlp.c_fc.weight[:, idx].clone())
                mlp.c_fc.bias = torch.nn.Parameter(mlp.c_fc.bias[idx].clone())
                mlp.c_fc.nf = size
                mlp.c_proj.weight = torch.nn.Parameter(mlp.c_proj.weight[idx].clone())
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = size
    if model.config.model_type == "gpt2":
        model.config.n_inner = size
    else:
        model.config.intermediate_size = size


def prune(model, dcfg, batches: list[dict]) -> dict:
    """Prune a copy of the teacher in place as distill.* says; returns what was done."""
    holder, attr = _decoder_layers(model)
    n = len(getattr(holder, attr))
    info: dict = {"teacher_layers": n}
    if dcfg.keep_layers is not None and dcfg.keep_layers >= n:
        raise ConfigError(f"distill.keep_layers ({dcfg.keep_layers}) must be below the teacher's {n} layers")
    bad = [i for i in dcfg.drop_layers if i >= n]
    if bad:
        raise ConfigError(f"distill.drop_layers {bad}: the teacher has layers 0..{n - 1}")
    if len(dcfg.drop_layers) >= n:
        raise ConfigError(f"distill.drop_layers removes all {n} layers of the teacher")
    need_measure = dcfg.keep_layers is not None or dcfg.mlp_size is not None
    influence, neurons = measure(model, batches, dcfg.mlp_size is not None) if need_measure else (None, None)
    if dcfg.keep_layers is not None:
        drop = sorted(sorted(range(n), key=lambda i: influence[i])[: n - dcfg.keep_layers])
        info["block_influence"] = [round(v, 5) for v in influence]
    else:
        drop = sorted(dcfg.drop_layers)
    if dcfg.mlp_size is not None:
        narrow_mlp(model, dcfg.mlp_size, neurons)
        info["mlp_size"] = dcfg.mlp_size
    if drop:
        drop_layers(model, drop)
    info["dropped_layers"] = drop
    info["student_layers"] = n - len(drop)
    return info


# --------------------------------------------------------------------------- the loss
def distill_loss_sum(s_logits, t_logits, labels, *, alpha: float, temperature: float, kl: str, chunk: int):
    """(loss summed over counted positions, CE sum, KL sum, positions counted).

    Position t's logits predict labels[t + 1]; positions whose label is -100 do not count, as
    in the model's own loss. The per-position softmaxes run `chunk` positions at a time under
    activation checkpointing, so only one chunk's float32 intermediates exist at once. A
    `t_logits` callable maps selected teacher rows lazily (alpha 0: no teacher at all).
    """
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    y = labels[:, 1:].reshape(-1)
    keep = (y != -100).nonzero(as_tuple=True)[0]
    y = y[keep]
    s = s_logits[:, :-1].reshape(-1, s_logits.shape[-1]).index_select(0, keep)
    T = float(temperature)

    def part(s_c, t_c, y_c):
        s32 = s_c.float()
        ce = F.cross_entropy(s32, y_c, reduction="sum")
        if t_c is None:
            return (1.0 - alpha) * ce, ce.detach(), torch.zeros((), device=ce.device)
        v = min(s32.shape[-1], t_c.shape[-1])  # a padded vocabulary's extra rows are never targets
        ls = F.log_softmax(s32[:, :v] / T, dim=-1)
        lt = F.log_softmax(t_c[:, :v].float() / T, dim=-1)
        if kl == "forward":  # KL(p_teacher || p_student)
            k = F.kl_div(ls, lt, log_target=True, reduction="sum")
        else:  # KL(p_student || p_teacher)
            k = F.kl_div(lt, ls, log_target=True, reduction="sum")
        return alpha * T * T * k + (1.0 - alpha) * ce, ce.detach(), k.detach()

    total = s.new_zeros((), dtype=torch.float32)
    ce_sum = torch.zeros((), device=s.device)
    kl_sum = torch.zeros((), device=s.device)
    for i in range(0, y.numel(), chunk):
        sl = slice(i, i + chunk)
        t_c = None
        if alpha > 0:
            t_c = t_logits(keep[sl]) if callable(t_logits) else t_logits[:, :-1].reshape(-1, t_logits.shape[-1]).index_select(0, keep[sl])
        if s.requires_grad:
            l_c, ce_c, kl_c = checkpoint(part, s[sl], t_c, y[sl], use_reentrant=False)
        else:
            l_c, ce_c, kl_c = part(s[sl], t_c, y[sl])
        total = total + l_c
        ce_sum = ce_sum + ce_c
        kl_sum = kl_sum + kl_c
    return total, ce_sum, kl_sum, y.numel()


def _teacher_rows(teacher, batch):
    """A function from selected (batch-flattened, shifted) positions to teacher logits, chunk by
    chunk: the teacher's full [batch, seq, vocab] logits are never built."""
    import torch

    with torch.no_grad():
        out = teacher.base_model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
        h = out[0][:, :-1]
        h = h.reshape(-1, h.shape[-1])
    head = teacher.get_output_embeddings()
    softcap = getattr(teacher.config, "final_logit_softcapping", None)

    def rows(idx):
        with torch.no_grad():
            z = head(h.index_select(0, idx))
            if softcap:
                z = torch.tanh(z / softcap) * softcap
            return z

    return rows


def make_trainer_class():
    """A transformers.Trainer whose training loss is the distillation loss (built lazily: the
    import of Trainer is heavy)."""
    from transformers import Trainer

    class DistillTrainer(Trainer):
        # compute_loss divides by num_items_in_batch itself: the Trainer must not divide again
        # by the accumulation steps (a per-micro-batch mean would double the loss at accumulation 2).
        loss_is_scaled_for_ga = True

        def __init__(self, *args, teacher=None, distill=None, **kwargs):
            super().__init__(*args, **kwargs)
            self.teacher = teacher() if callable(teacher) else teacher  # loaded now: after the up-to-date check
            self.dcfg = distill
            self.parts = {"ce": 0.0, "kl": 0.0, "n": 0}

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if not model.training:  # evaluation reports the student's own CE: comparable with train
                return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
            d = self.dcfg
            labels = inputs["labels"]
            fwd = {k: v for k, v in inputs.items() if k != "labels"}
            outputs = model(**fwd)  # no labels: the model computes no loss of its own
            t_rows = None
            if d.alpha > 0:
                if self.teacher.device != labels.device:
                    self.teacher.to(labels.device)
                t_rows = _teacher_rows(self.teacher, inputs)
            total, ce, kl, n = distill_loss_sum(outputs.logits, t_rows, labels, alpha=d.alpha, temperature=d.temperature, kl=d.kl, chunk=d.chunk_tokens)
            if num_items_in_batch is not None:
                loss = total / num_items_in_batch
                if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                    # num_items_in_batch counts every rank's tokens and DDP averages gradients: as the Trainer does.
                    loss = loss * self.accelerator.num_processes
            else:
                loss = total / max(n, 1) / self.current_gradient_accumulation_steps
            self.parts["ce"] += float(ce)
            self.parts["kl"] += float(kl)
            self.parts["n"] += n
            return (loss, outputs) if return_outputs else loss

        def log(self, logs, *args, **kwargs):
            if "loss" in logs and self.parts["n"]:
                n = self.parts["n"]
                logs = {**logs, "ce_loss": round(self.parts["ce"] / n, 6), "kl_loss": round(self.parts["kl"] / n, 6)}
                self.parts = {"ce": 0.0, "kl": 0.0, "n": 0}
            return super().log(logs, *args, **kwargs)

    return DistillTrainer


# --------------------------------------------------------------------------- the stage
def run(cfg, rd: RunDir, *, force: bool = False, nproc: int | None = None, nodes: dict | None = None, **_) -> dict:
    con = _console.current()
    d = cfg.distill
    if d is None:
        raise ConfigError(f"{cfg.source}: no distill section: add one with distill.teacher (a run directory, model directory or hub id), or use 'llmctl train'")
    rd.require("prepare", cfg)
    rec = teacher_record(d.teacher)
    from llmctl.hints import command

    # before any work: exit 2 on a mismatch
    check_tokenizer(rec["path"], rd.tokenizer_dir, d.teacher, command("prepare", cfg, rd.root, "--force"))
    identity = teacher_identity(rec)
    con.info(f"teacher: {d.teacher} ({rec['kind']}, {rec['path']}, weights sha256 {rec['model_hash'][:12]})")
    state: dict = {}
    headline: dict = {"teacher": d.teacher, "alpha": d.alpha, "temperature": d.temperature, "kl": d.kl}
    init: dict = {}  # filled by the pruning: which layers went, block influence

    def dtype():
        import torch

        t = device_and_dtype(cfg.train)[1]  # the student's
        return torch.float32 if t == torch.float16 else t  # the teacher's logits under fp16 overflow too easily

    def teacher():
        if "teacher" not in state:
            state["teacher"] = load_teacher(rec["path"], dtype(), cfg.model.trust_remote_code)
        return state["teacher"]

    def build_student(cfg_, tok):
        import torch

        student = load_teacher(rec["path"], torch.float32, cfg.model.trust_remote_code)  # master weights fp32
        if len(tok) > student.get_input_embeddings().weight.shape[0]:
            raise ConfigError(f"distill.teacher: this run's tokenizer has {len(tok)} tokens, the teacher's embeddings {student.get_input_embeddings().weight.shape[0]}")
        device = device_and_dtype(cfg.train)[0]
        student.to(device)
        batches = [{k: v.to(device) for k, v in b.items()} for b in calibration_batches(rd, d.calibration_batches, cfg.train.micro_batch_size, tok.pad_token_id)]
        init.update(prune(student, d, batches))
        student.requires_grad_(True)
        student.train()
        headline["pruned_layers"] = init["dropped_layers"]
        con.info(
            f"student: the teacher pruned to {init['student_layers']} of {init['teacher_layers']} layers"
            + (f" (dropped {init['dropped_layers']})" if init["dropped_layers"] else "")
            + (f", MLP width {init['mlp_size']}" if "mlp_size" in init else "")
        )
        return student

    hooks = Hooks(
        name="distill",
        build_model=build_student if d.student_init == "prune" else None,
        trainer_class=make_trainer_class(),
        trainer_kwargs={"teacher": teacher if d.alpha > 0 else None, "distill": d},
        identity=identity,
        manifest={"teacher": rec, "student_init": init},
        headline=headline,
        log_keys=("ce_loss", "kl_loss"),
    )
    return train_run(cfg, rd, force=force, nproc=nproc, hooks=hooks, nodes=nodes)
