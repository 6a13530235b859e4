"""Which model architectures each export format takes: read by the pre-flight checks
(llmctl/checks.py, before any training) and by the exporters themselves, so that neither
reaches into the other. A format not listed takes every architecture.

Only the standard library: `config validate` and every stage import it.
"""

from __future__ import annotations

# model_type values (config.json) an export format writes; gguf: llama.cpp's llama graph
ARCHITECTURES: dict[str, tuple[str, ...]] = {"gguf": ("llama",)}


def architectures(fmt: str) -> tuple[str, ...] | None:
    """The model types `fmt` takes; None: any."""
    return ARCHITECTURES.get(fmt)
