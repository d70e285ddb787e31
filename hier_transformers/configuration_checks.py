"""Checks shared by the package's configs (`HierarchicalConfig`, `HierarchicalXLConfig`).

Unknown keys: `PreTrainedConfig.__init__` (transformers 5.24) sets its dataclass fields from the keyword arguments
and hands every other one to `__post_init__`, which consumes its own bookkeeping keys (`torch_dtype`, `num_labels`,
`name_or_path`, `output_attentions`, `attn_implementation`, generation parameters, ...) and sets whatever is left as
an attribute, silently: `HierarchicalXLConfig(local_windw=32)` would train the default window. `reject_unknown_keys`
refuses those leftovers when a user passes them. A dict that transformers serialised itself (every `to_dict()` /
`config.json` carries `transformers_version`) may hold attributes that a library or an older version set; loading
it keeps them, as transformers does, with a warning.
"""

from __future__ import annotations

import difflib
from dataclasses import fields

from transformers.activations import ACT2FN
from transformers.configuration_utils import PreTrainedConfig
from transformers.generation.configuration_utils import GenerationConfig
from transformers.utils import logging

logger = logging.get_logger(__name__)

# Keyword arguments `PreTrainedConfig` accepts besides its dataclass fields, and keys its serialisation writes.
TRANSFORMERS_CONFIG_KEYS = frozenset(
    {
        "model_type",
        "auto_map",
        "custom_pipelines",
        "torch_dtype",
        "num_labels",
        "name_or_path",
        "_name_or_path",
        "_commit_hash",
        "output_attentions",
        "attn_implementation",
        "experts_implementation",
        "_attn_implementation_internal",
        "_experts_implementation_internal",
        "per_layer_config",
        "rope_scaling",
        "quantization_config",
        "transformers_weights",
    }
)


def reject_unknown_keys(config: PreTrainedConfig, kwargs: dict) -> None:
    """Call first in `__post_init__(**kwargs)`: raise a `ValueError` naming the keys of `kwargs` that are neither a
    field of `config` nor a transformers bookkeeping key (a config being loaded from `to_dict()` output only warns)."""
    known = TRANSFORMERS_CONFIG_KEYS | GenerationConfig._get_default_generation_params().keys()
    unknown = sorted(key for key in kwargs if key not in known)
    if not unknown:
        return
    valid = sorted(field.name for field in fields(config) if not field.name.startswith("_"))
    hints = {key: difflib.get_close_matches(key, valid, n=1) for key in unknown}
    described = ", ".join(f"`{key}`" + (f" (did you mean `{hint[0]}`?)" if hint else "") for key, hint in hints.items())
    if config.transformers_version is not None:  # a serialised config (config.json / to_dict()): keep, like transformers
        logger.warning(f"{type(config).__name__}: keeping unknown keys of a saved config: {described}.")
        return
    raise ValueError(f"{type(config).__name__} got unknown keys {described}. Valid fields: {', '.join(valid)}.")


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_positive_ints(config: PreTrainedConfig, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(config, name)
        if not is_int(value) or value < 1:
            raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}.")


def check_positive_numbers(config: PreTrainedConfig, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(config, name)
        if not is_number(value) or not value > 0:
            raise ValueError(f"`{name}` must be a number > 0, got {value!r}.")


def check_activation(config: PreTrainedConfig) -> None:
    if not isinstance(config.hidden_act, str) or config.hidden_act not in ACT2FN:
        raise ValueError(f"`hidden_act` must be one of {sorted(ACT2FN)}, got {config.hidden_act!r}.")


def check_token_ids(config: PreTrainedConfig, names: tuple[str, ...]) -> None:
    """Each of `names` is None, an id in [0, vocab_size), or (eos) a list of such ids."""
    for name in names:
        value = getattr(config, name)
        ids = value if isinstance(value, list) else [value]
        if value is not None and not all(is_int(item) and 0 <= item < config.vocab_size for item in ids):
            raise ValueError(f"`{name}` must be None or an id in [0, vocab_size={config.vocab_size}), got {value!r}.")
