"""The experiment config: one YAML file, one section per stage.

Four rooms, each changed for its own reason:

    schema.py      the sections and their keys (pydantic, unknown keys forbidden), each key
                   documented once with Field(description=...)
    loading.py     YAML -> Config: --set overrides, validation, one-line errors with the
                   file:line and the nearest valid key
    staleness.py   which keys each stage's output depends on, and how a recorded run differs
    reference.py   the key reference (`llmctl config show --doc`, the README's table)

Callers import from `llmctl.config`; the names below are the whole public surface. Nothing
here imports torch, transformers or datasets: `llmctl --help` stays instant.
"""

from llmctl.config.loading import apply_overrides, config_to_yaml, load_config, parse_override
from llmctl.config.reference import README_END, README_START, config_doc, readme_with_reference
from llmctl.config.schema import (
    STAGES,
    Config,
    CurateConfig,
    DataConfig,
    DenyConfig,
    DistillConfig,
    EvalConfig,
    ExportConfig,
    GenerateConfig,
    LoraSection,
    ModelConfig,
    NearDedupConfig,
    PIIConfig,
    QualityConfig,
    RailAction,
    RailConfig,
    RunConfig,
    SafetyConfig,
    Section,
    ServeConfig,
    ThresholdsConfig,
    TokenizerConfig,
    TrainConfig,
    parse_duration,
)
from llmctl.config.staleness import (
    BOOKKEEPING_KEYS,
    STAGE_SECTIONS,
    show_value,
    stage_kind,
    stage_values,
    time_fitted,
    value_changes,
    values_hash,
)

__all__ = [
    # schema
    "STAGES", "Section", "Config", "RunConfig", "DataConfig", "CurateConfig", "QualityConfig",
    "NearDedupConfig", "PIIConfig", "TokenizerConfig", "ModelConfig", "LoraSection", "TrainConfig",
    "EvalConfig", "ThresholdsConfig", "GenerateConfig", "ExportConfig", "ServeConfig",
    "SafetyConfig", "RailConfig", "RailAction", "DenyConfig", "DistillConfig", "parse_duration",
    # loading
    "load_config", "parse_override", "apply_overrides", "config_to_yaml",
    # staleness
    "STAGE_SECTIONS", "BOOKKEEPING_KEYS", "stage_kind", "stage_values", "time_fitted",
    "values_hash", "value_changes", "show_value",
    # reference
    "config_doc", "readme_with_reference", "README_START", "README_END",
]
