"""llama.cpp's two-file form of an image-text model: the language model through llmctl's llama
GGUF writer (llmctl/exporters/gguf.py), and an mmproj GGUF holding the vision tower and the
projector, which llama.cpp's multimodal library (tools/mtmd, clip.cpp) reads:
`llama-mtmd-cli -m model-f32.gguf --mmproj mmproj-f32.gguf --image PIC -p TEXT`.

What is written is what clip.cpp runs as LLaVA (`clip.projector_type` "mlp": linear, GELU,
linear over the tower's patch features): a LLaVA whose tower is a SigLIP ViT, whose language
model is a llama, that takes one feature layer with every patch ('full'). Anything else is
refused before any work by `check_supported`, which says why. CLIP towers are refused for a
reason in llama.cpp itself: its LLaVA graph appends CLIP's class token after the patches but
still feeds rows 1..N to the language model, so each patch gets its neighbour's position and the
class token's output is read as a patch (ggml-org/llama.cpp#25814, unfixed in the build tested).

Keys and tensor names are clip.cpp's (tools/mtmd/clip-impl.h): `clip.vision.*` hyperparameters,
`clip.vision.feature_layer` (an index into the tower's hidden states, 0 = the embeddings, written
explicitly: without it clip.cpp stops one layer early, LLaVA-1.5's -2), `v.blk.N.*`, `mm.0/mm.2`.

The public surface:
- `check_supported(model, proc)`: ConfigError (exit 2) naming why llama.cpp would not run it as
  trained; `check_model(model)`: the part the model alone decides (train checks it first).
- `language_model(model)`: the llama inside, as a LlamaForCausalLM sharing nothing with `model`.
- `chat_template(proc)`: the template the language GGUF carries (llmctl's prompt rule).
- `write(model, proc, out, qtype, name) -> Path`: `out/mmproj-{qtype}.gguf` (qtype f32 or f16).
- `tensors(model)`, `expected_keys(model, proc)`: what the mmproj holds.
- `check_file(path, model, proc, qtype) -> dict`: the file read back against the model.
- `features_diff(path, model, pixel_values) -> (diff, scale)`: image features from the file's tensors vs the model's.
- `llama_cpp_describe(model_gguf, mmproj_gguf, image, prompt, n)`: llama-mtmd-cli's greedy answer.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from types import SimpleNamespace

from llmctl.errors import ConfigError
from llmctl.export_support import MMPROJ_ACTS as ACTS
from llmctl.export_support import MMPROJ_FIX as FIX
from llmctl.export_support import check_image_text_model_config

TYPES = ("f32", "f16")  # the mmproj's own precision: the tower is small beside the language model
PROJECTOR = "mlp"  # clip.cpp's PROJECTOR_TYPE_MLP: mm.0 (linear), GELU, mm.2 (linear)

# names under the vision tower -> clip.cpp's; {i}: layer
_EMBED = {
    "embeddings.patch_embedding.weight": "v.patch_embd.weight",
    "embeddings.patch_embedding.bias": "v.patch_embd.bias",
    "embeddings.position_embedding.weight": "v.position_embd.weight",
}
_LAYER = {
    "layer_norm1": "ln1", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.out_proj": "attn_out", "layer_norm2": "ln2", "mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down",
}
_PROJ = {"linear_1": "mm.0", "linear_2": "mm.2"}


def _tower(model):
    """The vision transformer itself (SiglipVisionModel wraps it in `vision_model`)."""
    vt = model.model.vision_tower
    return getattr(vt, "vision_model", vt)


def feature_layer(model) -> int:
    """LLaVA's vision_feature_layer as clip.cpp counts it: an index into the tower's hidden states
    (0 = after the embeddings, N = after block N), never negative."""
    c = model.config
    n = c.vision_config.num_hidden_layers
    fl = c.vision_feature_layer
    return fl if fl >= 0 else n + 1 + fl


def _refuse(why: str):
    raise ConfigError(f"export gguf: llama.cpp cannot run this image-text model as trained: {why}; {FIX}")


def check_supported(model, proc) -> None:
    """Refuse (exit 2), naming why, what clip.cpp's LLaVA graph would not compute as trained."""
    check_model(model)
    ip = proc.image_processor
    side = model.config.vision_config.image_size
    size = dict(getattr(ip, "size", None) or {})
    if not (size.get("height") == side and size.get("width") == side) and size.get("shortest_edge") != side:
        _refuse(f"its processor resizes to {size}, not to the tower's {side}x{side}, which is what llama.cpp resizes to")
    if not (getattr(ip, "do_normalize", True) and abs(float(getattr(ip, "rescale_factor", 1 / 255)) - 1 / 255) < 1e-9):
        _refuse("its processor does not scale pixels to [0, 1] and normalize, as llama.cpp does")
    from llmctl.exporters import gguf as gguf_x

    gguf_x.check_supported(SimpleNamespace(config=model.config.text_config), proc.tokenizer)  # it reads the config only


def check_model(model) -> None:
    """The part of `check_supported` the model alone decides (train checks its config before training)."""
    check_image_text_model_config(model.config)
    c = model.config
    from llmctl.exporters import gguf as gguf_x

    gguf_x.check_supported(SimpleNamespace(config=c.text_config))  # the llama's own rules (activation, rope)


def language_model(model):
    """The llama inside a LLaVA, as its own LlamaForCausalLM (weights copied, tying kept)."""
    import copy

    import torch
    from transformers import LlamaForCausalLM

    tc = copy.deepcopy(model.config.text_config)
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    tc.tie_word_embeddings = emb.data_ptr() == head.data_ptr()
    lm = LlamaForCausalLM(tc).to(torch.float32)
    sd = {"model." + k: v for k, v in model.model.language_model.state_dict().items()}
    sd["lm_head.weight"] = head
    missing, unexpected = lm.load_state_dict(sd, strict=False)
    if unexpected or [m for m in missing if not (tc.tie_word_embeddings and m == "lm_head.weight")]:
        raise ValueError(f"the language model does not map onto LlamaForCausalLM: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if tc.tie_word_embeddings:
        lm.tie_weights()
    return lm.eval()


def chat_template(proc) -> str:
    """The processor's own template, else llmctl's prompt rule for template-less LLaVA
    (llmctl.vision.infer.PLAIN_CHAT_TEMPLATE): what llama.cpp formats a turn with."""
    from llmctl.vision.infer import PLAIN_CHAT_TEMPLATE

    return getattr(proc, "chat_template", None) or PLAIN_CHAT_TEMPLATE


def _named(model):
    """(gguf name, module, its state-dict key, float32 array) of everything clip.cpp reads. The tower's
    post_layernorm is left out: LLaVA reads hidden states, which come before it."""
    vt, proj = _tower(model), model.model.multi_modal_projector
    vsd = {k: t.detach().float().cpu().numpy() for k, t in vt.state_dict().items()}
    psd = {k: t.detach().float().cpu().numpy() for k, t in proj.state_dict().items()}
    for hname, gname in _EMBED.items():
        if hname in vsd:
            yield gname, vt, hname, vsd[hname]
    for i in range(model.config.vision_config.num_hidden_layers):
        for hname, gname in _LAYER.items():
            for kind in ("weight", "bias"):
                key = f"encoder.layers.{i}.{hname}.{kind}"
                if key in vsd:
                    yield f"v.blk.{i}.{gname}.{kind}", vt, key, vsd[key]
    for hname, gname in _PROJ.items():
        for kind in ("weight", "bias"):
            yield f"{gname}.{kind}", proj, f"{hname}.{kind}", psd[f"{hname}.{kind}"]


def tensors(model):
    """(gguf name, float32 numpy array) of every tensor the mmproj holds, in clip.cpp's naming."""
    for gname, _, _, arr in _named(model):
        yield gname, arr


def _stored(arr, qtype: str):
    """The array as the file stores it: 1-D tensors f32 (clip.cpp adds them in f32), matrices at qtype."""
    import numpy as np

    return arr.astype(np.float32) if arr.ndim == 1 or qtype == "f32" else arr.astype(np.float16)


def _mean_std(proc) -> tuple[list[float], list[float]]:
    ip = proc.image_processor
    return [float(x) for x in ip.image_mean], [float(x) for x in ip.image_std]


def write(model, proc, out: Path, qtype: str, name: str) -> Path:
    """`out/mmproj-{qtype}.gguf`: clip.cpp's keys for the tower, the projector and the preprocessing."""
    import gguf

    if qtype not in TYPES:
        raise ConfigError(f"mmproj type {qtype!r}: expected one of {', '.join(TYPES)}")
    c, v = model.config, model.config.vision_config
    path = out / f"mmproj-{qtype}.gguf"
    w = gguf.GGUFWriter(str(path), "clip")  # clip.cpp's architecture name for an mmproj
    w.add_type(gguf.GGUFType.MMPROJ)
    w.add_name(name)
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if qtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
    w.add_clip_has_vision_encoder(True)
    w.add_clip_projector_type(PROJECTOR)
    w.add_vision_projection_dim(c.text_config.hidden_size)
    w.add_vision_image_size(v.image_size)
    w.add_vision_patch_size(v.patch_size)
    w.add_vision_embedding_length(v.hidden_size)
    w.add_vision_feed_forward_length(v.intermediate_size)
    w.add_vision_block_count(v.num_hidden_layers)
    w.add_vision_head_count(v.num_attention_heads)
    w.add_vision_attention_layernorm_eps(float(v.layer_norm_eps))
    flag = ACTS[v.hidden_act]
    if flag == "use_gelu":
        w.add_vision_use_gelu(True)
    elif flag == "use_silu":
        w.add_vision_use_silu(True)
    w.add_array("clip.vision.feature_layer", [feature_layer(model)])  # gguf-py has no helper for it
    mean, std = _mean_std(proc)
    w.add_vision_image_mean(mean)
    w.add_vision_image_std(std)
    for tname, arr in tensors(model):
        w.add_tensor(tname, _stored(arr, qtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _field(reader, key: str):
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def expected_keys(model, proc) -> dict:
    """The clip.cpp keys `write` puts in the file, with their values."""
    c, v = model.config, model.config.vision_config
    mean, std = _mean_std(proc)
    act = {f"clip.{ACTS[v.hidden_act]}": True} if ACTS[v.hidden_act] else {}
    return {**act, "general.architecture": "clip", "general.type": "mmproj", "clip.has_vision_encoder": True, "clip.projector_type": PROJECTOR,
            "clip.vision.projection_dim": c.text_config.hidden_size, "clip.vision.image_size": v.image_size,
            "clip.vision.patch_size": v.patch_size, "clip.vision.embedding_length": v.hidden_size,
            "clip.vision.feed_forward_length": v.intermediate_size, "clip.vision.block_count": v.num_hidden_layers,
            "clip.vision.attention.head_count": v.num_attention_heads, "clip.vision.feature_layer": [feature_layer(model)],
            "clip.vision.image_mean": mean, "clip.vision.image_std": std}


def check_file(path: Path, model, proc, qtype: str) -> dict:
    """The mmproj read back with gguf's reader: every key `write` meant (floats to f32 precision) and
    every tensor bit for bit as `write` rounds it, nothing more. {"passed": bool, ...}."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(path))
    bad = []
    for key, want in expected_keys(model, proc).items():
        got = _field(reader, key)
        same = np.allclose(got, want, rtol=1e-6) if isinstance(want, list) and want and isinstance(want[0], float) else got == want
        if not same:
            bad.append(f"{key}={got!r} (expected {want!r})")
    have = {t.name: t for t in reader.tensors}
    want = dict(tensors(model))
    if set(have) != set(want):
        bad.append(f"tensors {sorted(set(have) ^ set(want))[:4]} differ from the model's")
    for tname, arr in want.items():
        t = have.get(tname)
        if t is None:
            continue
        got = np.asarray(t.data).reshape(arr.shape)
        if not np.array_equal(got, _stored(arr, qtype)):
            bad.append(f"tensor {tname} differs from the model's")
    return {"keys": len(expected_keys(model, proc)), "tensors": len(want), "problems": bad[:5], "passed": not bad}


def features_diff(path: Path, model, pixel_values) -> tuple[float, float]:
    """(max |difference|, max(1, largest |feature|)) between the image features (tower + projector)
    computed with the weights read back from the mmproj file and with the model's own: each tensor
    lands where it came from."""
    import copy

    import gguf
    import numpy as np
    import torch

    have = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    m = copy.deepcopy(model).eval()
    with torch.no_grad():
        for gname, module, key, arr in _named(m):
            t = have[gname]
            module.get_parameter(key).copy_(torch.from_numpy(np.array(t.data, dtype=np.float32).reshape(arr.shape)))
        want = model.model.get_image_features(pixel_values=pixel_values)
        got = m.model.get_image_features(pixel_values=pixel_values)
    want = getattr(want, "pooler_output", want)
    got = getattr(got, "pooler_output", got)
    want, got = (torch.cat(list(x)) if isinstance(x, (list, tuple)) else x for x in (want, got))
    return float((got - want).abs().max()), max(1.0, float(want.abs().max()))


def llama_cpp_describe(model_gguf: Path, mmproj_gguf: Path, image: Path, prompt: str, max_new_tokens: int, threads: int = 2,
                       tries: int = 5) -> str:
    """llama.cpp's greedy answer (`llama-mtmd-cli`, temperature 0) to `prompt` about `image`, the
    prompt formatted by the chat template the language GGUF carries.

    The CLI prints through llama.cpp's asynchronous logger, which may drop its last lines when the
    process exits (ggml-org/llama.cpp#22142): the answer counts only when the blank lines the CLI
    logs after it came out too (the log is in order, so then the answer is whole); otherwise the
    run is repeated. An answer that itself ends in blank lines would read as cut: captions do not."""
    from llmctl.exporters.gguf import llama_cpp

    cli = llama_cpp("llama-mtmd-cli")
    if cli is None:
        raise FileNotFoundError("llama-mtmd-cli not found in $LLAMA_CPP_BIN, on PATH or in /opt/llamacpp/build/bin")
    cmd = [str(cli), "-m", str(model_gguf), "--mmproj", str(mmproj_gguf), "--image", str(image), "-p", prompt,
           "-n", str(max_new_tokens), "--temp", "0", "--seed", "0", "-t", str(threads), "-c", "512", "--jinja", "--no-warmup"]
    for _ in range(tries):
        r = subprocess.run(cmd, capture_output=True, timeout=300, stdin=subprocess.DEVNULL)
        err = r.stderr.decode(errors="replace")
        if r.returncode != 0:
            last = [ln for ln in err.strip().splitlines() if " E " in ln or "error" in ln.lower()] or err.strip().splitlines() or ["?"]
            raise RuntimeError(f"llama-mtmd-cli failed on {model_gguf.name} + {mmproj_gguf.name}: {last[-1].strip()}")
        out = r.stdout.decode(errors="replace")
        if out.endswith("\n\n"):  # the CLI's last line, logged after the answer: the answer is whole
            return out.strip()
    raise RuntimeError(f"llama-mtmd-cli lost the end of its output {tries} times (llama.cpp's logger, ggml-org/llama.cpp#22142)")
