"""Config: one tree of dataclasses (OmegaConf structured configs), YAML presets, ``key=value`` overrides."""

from vlkit.config.load import ConfigError, apply_overrides, finalize, list_presets, load_config, to_dict, to_yaml
from vlkit.config.schema import (
    Config,
    DataConfig,
    LLMConfig,
    MMConfig,
    MMLLMConfig,
    MMVisionEncoderConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    ScheduleConfig,
    TextConfig,
    TrainerConfig,
    TransformerConfig,
    VisionConfig,
)

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "LLMConfig",
    "MMConfig",
    "MMLLMConfig",
    "MMVisionEncoderConfig",
    "ModelConfig",
    "OptimConfig",
    "ParallelConfig",
    "ScheduleConfig",
    "TextConfig",
    "TrainerConfig",
    "TransformerConfig",
    "VisionConfig",
    "apply_overrides",
    "finalize",
    "list_presets",
    "load_config",
    "to_dict",
    "to_yaml",
]
