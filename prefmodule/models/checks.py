"""A module's settings checked before any weights load: each error names the option (as the CLI spells
it), the value and what is allowed."""

from __future__ import annotations

import math
import os
from typing import Any

from prefmodule.errors import ConfigError, MissingFileError
from prefmodule.paths import resolve

DTYPES = ("float32", "bfloat16", "float16")


def require(ok: bool, option: str, value: Any, allowed: str) -> None:
    """Raise a :class:`ConfigError` ``model.<option>=<value>: <allowed>`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"model.{option}={value!r}: {allowed}.")


def check_settings(beta: float, lr: float, weight_decay: float, warmup: float, logps_chunk_size: int, dtype: str,
                   attn_implementation: str | None) -> None:
    """The numeric and named settings every :class:`~prefmodule.objectives.PreferenceModule` takes."""
    require(_finite(beta) and beta > 0, "beta", beta, "must be > 0 (the objective's temperature or weight; DPO "
            "typically 0.1)")
    require(_finite(lr) and lr > 0, "lr", lr, "must be > 0 (the peak learning rate, e.g. 5e-7 for DPO on a 7B model)")
    require(_finite(weight_decay) and weight_decay >= 0, "weight_decay", weight_decay, "must be >= 0")
    require(_finite(warmup) and (0 <= warmup < 1 or (warmup >= 1 and float(warmup).is_integer())), "warmup", warmup,
            "must be a fraction of all steps in [0, 1) or a whole number of steps")
    require(isinstance(logps_chunk_size, int) and logps_chunk_size >= 0, "logps_chunk_size", logps_chunk_size,
            "must be a whole number >= 0 (response tokens per chunk through the LM head; 0 = full logits)")
    require(dtype in DTYPES, "dtype", dtype, f"must be one of {list(DTYPES)}")
    if attn_implementation is not None and "/" not in attn_implementation:  # a name with "/" is a Hub kernel
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        allowed = ["eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()]
        require(attn_implementation in allowed, "attn_implementation", attn_implementation, f"must be one of {allowed}")


def check_source(option: str, name: Any) -> str:
    """``name`` as a loadable location: an existing folder, an ``asset://`` name or a Hub id (``owner/name``)."""
    require(isinstance(name, str) and name.strip() != "", option, name, "must be a model folder (written by "
            "save_pretrained), an asset:// name or a Hugging Face Hub id")
    try:
        location = resolve(name)
    except FileNotFoundError as error:
        raise MissingFileError(f"model.{option}={name!r}: {error}") from None
    hub_id = not os.path.exists(location) and location.count("/") == 1 and not location.startswith((".", "/", "~"))
    if not os.path.isdir(location) and not hub_id:
        found = "a file, not a folder" if os.path.exists(location) else "no such folder"
        raise MissingFileError(f"model.{option}={name!r}: {found} ({os.path.abspath(location)}). Pass a folder written "
                               "by save_pretrained, an asset:// name, or a Hugging Face Hub id (owner/name).")
    return location


def check_causal_lm(option: str, name: str, trust_remote_code: bool = False) -> None:
    """``name`` is a causal (decoder) language model: read from its ``config.json`` alone, before any weights."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    location = check_source(option, name)
    try:
        config = AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code)
    except OSError as error:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        where = "the Hub is not contacted (HF_HUB_OFFLINE is set) and it is not in the local cache" if offline \
            else "it could not be read"
        raise MissingFileError(f"model.{option}={name!r}: no model config found: {where} "
                               f"({str(error).splitlines()[0]}). Pass a folder written by save_pretrained.") from None
    except ValueError as error:
        raise ConfigError(f"model.{option}={name!r}: its config.json cannot be used: {error}") from None
    causal_classes = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    declared = set(getattr(config, "architectures", None) or ())
    remote = "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    decoder = config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and (
        config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES or config.is_decoder)
    if not (declared & causal_classes or remote or (decoder and not declared - causal_classes)):
        kind = ", ".join(sorted(declared)) or config.model_type
        raise ConfigError(f"model.{option}={name!r} is a {kind} model, not a causal language model: preference "
                          "training needs a decoder that predicts the next token (e.g. Llama, Qwen, Mistral, GPT-2).")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
