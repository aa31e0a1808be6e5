"""One typed config tree for a livr run: dataclasses, loaded from YAML, overridden by `key=value`.

    cfg = load_config("configs/demo.yaml", ["latents.num_latents=8", "optim.lr=3e-4"])

Every error is one line naming the offending key and value (`ConfigError`). A run saves its resolved
config (`save_config`) and that file alone reproduces the run. `schema` holds the dataclasses, `checks` the
validation (and the checks higher layers register), `load` the YAML / override / dict round trip.
"""
from livr.config.checks import CHECKS, check_data_paths, check_paths, looks_like_path, register_check, validate
from livr.config.load import dump_config, flatten, from_dict, load_config, parse_overrides, save_config, to_dict
from livr.config.schema import (
    Config,
    ConfigError,
    DataConfig,
    DistributedConfig,
    EvalConfig,
    LatentConfig,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    TrackingConfig,
    TrainConfig,
    TuneConfig,
)

__all__ = ["CHECKS", "Config", "ConfigError", "DataConfig", "DistributedConfig", "EvalConfig", "LatentConfig",
           "LoraConfig", "ModelConfig", "OptimConfig", "TrackingConfig", "TrainConfig", "TuneConfig",
           "check_data_paths", "check_paths", "dump_config", "flatten", "from_dict", "load_config",
           "looks_like_path", "parse_overrides", "register_check", "save_config", "to_dict", "validate"]
