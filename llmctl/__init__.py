"""llmctl: a command-line toolkit for developing language models."""

__version__ = "0.1.0"
