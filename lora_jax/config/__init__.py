"""Configuration: the model's hyperparameters and the schema of a training run.

  model.py    LlamaConfig (HF config.json field names) and its presets
  schema.py   default_config(): every run key and its default; type checks, validation
  loading.py  config files (get_config()) and --config.key=value overrides
  build.py    the objects a run's sections build (model config, LoRA config, ...)
  errors.py   ConfigError, naming the config key at fault

Config files live in configs/; the paper's regimes and sweeps in lora_jax.experiments.
"""

from lora_jax.config.build import frozen_patterns, keep_steps, lora_config, model_config_from
from lora_jax.config.errors import ConfigError
from lora_jax.config.loading import (OVERRIDE_PREFIX, apply_override, call_get_config, load_config,
                                     load_module, parse_override, split_overrides)
from lora_jax.config.model import PRESETS, LlamaConfig, preset
from lora_jax.config.schema import (RESUME_SAFE, check_schema, default_config, diff, flatten,
                                    from_dict, to_dict, validate_config)

__all__ = [
    "LlamaConfig", "preset", "PRESETS", "ConfigError", "default_config", "validate_config",
    "check_schema", "flatten", "to_dict", "from_dict", "diff", "RESUME_SAFE", "load_config",
    "load_module", "call_get_config", "apply_override", "parse_override", "split_overrides",
    "OVERRIDE_PREFIX", "model_config_from", "lora_config", "frozen_patterns", "keep_steps",
]
