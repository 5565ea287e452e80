"""The run config composed of the components' configs (the model's lives in lumina_ds.models.config), the presets
registry and YAML load/save."""

from lumina_ds.config.io import config_from_dict, config_to_dict, load_config, save_config
from lumina_ds.config.presets import PRESETS, get_preset
from lumina_ds.config.run import (
    CheckpointConfig,
    DataConfig,
    DistributedConfig,
    LoggingConfig,
    RunConfig,
    TrainConfig,
)

__all__ = [
    "PRESETS",
    "CheckpointConfig",
    "DataConfig",
    "DistributedConfig",
    "LoggingConfig",
    "RunConfig",
    "TrainConfig",
    "config_from_dict",
    "config_to_dict",
    "get_preset",
    "load_config",
    "save_config",
]
