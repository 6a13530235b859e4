"""Image parts of chat requests for image-text models: OpenAI's
`{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}`.

data: URIs are decoded; http(s) URLs are refused (400) unless serve.allow_remote_images,
since a server that fetches what a client names can be pointed at internal addresses (SSRF).
Too many images is a 400, too large a one a 413; a corrupt one a 400 naming the part. The
prompt follows the rule prepare trained on (llmctl.vision.infer.prompt_text)."""

from __future__ import annotations

import base64
import binascii
import re

from llmctl.server.rails import checked_input
from llmctl.server.schemas import ApiError

_DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,(?P<data>.*)$", re.S)


def has_images(req) -> bool:
    return any(m.image_urls() for m in req.messages)


def _fetch(url: str, limit: int, param: str) -> bytes:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 (http/https only, checked by the caller)
            raw = resp.read(limit + 1)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise ApiError(400, f"{param}: cannot fetch the image: {e}", param=param) from None
    if len(raw) > limit:
        raise ApiError(413, f"{param}: the image is larger than this server takes ({limit} bytes, serve.max_image_bytes)", param=param)
    return raw


def image_bytes(url: str, limits, param: str) -> bytes:
    """The bytes of one image_url part, or the ApiError the client should get."""
    if url.startswith(("http://", "https://")):
        if not limits.allow_remote_images:
            raise ApiError(400, f"{param}: remote image URLs are refused by this server (a fetching server is an SSRF risk): "
                                "send the image inline as a data: URI (data:image/png;base64,...), or start the server with serve.allow_remote_images: true",
                           param=param, code="remote_image_refused")
        return _fetch(url, limits.max_image_bytes, param)
    m = _DATA_URI.match(url)
    if not m:
        raise ApiError(400, f"{param}: expected a data: URI (data:image/png;base64,...) or an http(s) URL", param=param)
    if m["mime"] and not m["mime"].startswith("image/"):
        raise ApiError(400, f"{param}: the data: URI holds {m['mime']}, not an image", param=param)
    data = m["data"]
    if len(data) * 3 // 4 > limits.max_image_bytes + 3:
        raise ApiError(413, f"{param}: the image is larger than this server takes ({limits.max_image_bytes} bytes, serve.max_image_bytes)", param=param)
    try:
        raw = base64.b64decode(data, validate=True) if m["b64"] else data.encode("latin-1")
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise ApiError(400, f"{param}: the data: URI is not valid base64", param=param) from None
    if len(raw) > limits.max_image_bytes:
        raise ApiError(413, f"{param}: the image is larger than this server takes ({limits.max_image_bytes} bytes, serve.max_image_bytes)", param=param)
    return raw


def _decode(raw: bytes, limits, param: str):
    from llmctl.vision.images import BadImage, decode

    try:
        return decode(raw, limits.max_image_pixels)
    except BadImage as e:
        status = 413 if "pixels" in str(e) else 400
        raise ApiError(status, f"{param}: {e}", param=param) from None


def image_prompt(st, req, rid: str) -> tuple[list[int], dict]:
    """(the prompt's token ids with the image tokens, the processor's image tensors) of a chat
    request with image parts; the text goes through the input rails first."""
    proc = getattr(st.engine, "processor", None)
    if proc is None:
        raise ApiError(400, "this model takes no images (it has no image processor): send text only", param="messages", code="images_unsupported")
    limits = st.image_limits
    urls = [(i, k, u) for i, m in enumerate(req.messages) for k, u in enumerate(m.image_urls())]
    if len(urls) > limits.max_images:
        raise ApiError(400, f"messages: {len(urls)} images; this server takes at most {limits.max_images} a request (serve.max_images)", param="messages")
    pics = [_decode(image_bytes(u, limits, f"messages[{i}].content[{k}]"), limits, f"messages[{i}].content[{k}]") for i, k, u in urls]
    texts = [checked_input(st.rails, m.text(), rid, f"messages[{i}].content") for i, m in enumerate(req.messages)]
    prompt = _render(proc, req, texts)
    enc = proc(images=pics, text=[prompt], return_tensors="pt")
    ids = enc["input_ids"][0].tolist()
    return ids, {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}


def _render(proc, req, texts: list[str]) -> str:
    """The chat through the processor's template; a model without one (llmctl's LLaVA) takes one user turn with one image."""
    from llmctl.vision.infer import prompt_text

    if getattr(proc, "chat_template", None):
        msgs = [{"role": m.role, "content": [{"type": "image"} for _ in m.image_urls()] + [{"type": "text", "text": t}]}
                for m, t in zip(req.messages, texts)]
        return proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    users = [i for i, m in enumerate(req.messages) if m.role != "system"]
    if len(users) != 1 or req.messages[users[0]].role != "user" or len(req.messages[users[0]].image_urls()) != 1:
        raise ApiError(400, "messages: this model has no chat template and answers one user message holding one image (and its question)", param="messages")
    return prompt_text(proc, texts[users[0]])
