"""Loading Hugging Face models and tokenizers from a local path, an ``asset://`` name or a hub id."""

from __future__ import annotations

import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from prefmodule.errors import ConfigError
from prefmodule.paths import resolve

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load a tokenizer for right-padded training; a missing pad token falls back to EOS."""
    tokenizer = _from_pretrained(AutoTokenizer, name_or_path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token is None:
        raise ConfigError(f"the tokenizer of {name_or_path!r} has no EOS token: preference training ends every "
                          "response with it. Use a tokenizer that has one (model.tokenizer), or set its eos_token "
                          "and save it with save_pretrained.")
    tokenizer.padding_side = "right"
    return tokenizer


def load_causal_lm(name_or_path: str, dtype: str = "float32", trust_remote_code: bool = False,
                   attn_implementation: str | None = None) -> PreTrainedModel:
    """Load a causal LM with float32 weights by default (Lightning's precision flag handles mixed precision)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    attention = {"attn_implementation": attn_implementation} if attn_implementation else {}
    return _from_pretrained(
        AutoModelForCausalLM, name_or_path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, **attention
    )


def _from_pretrained(auto_class, name_or_path: str, **kwargs):
    location = resolve(name_or_path)
    try:
        return auto_class.from_pretrained(location, **kwargs)
    except OSError as error:
        if os.path.isdir(location):
            raise
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        hint = "HF_HUB_OFFLINE is set, so the Hub is not contacted" if offline else "the Hub could not be reached"
        raise OSError(
            f"Could not load {name_or_path!r}: it is not a local directory and {hint}. "
            "Pass a local path (a folder written by save_pretrained) or run where the Hub is reachable."
        ) from error
