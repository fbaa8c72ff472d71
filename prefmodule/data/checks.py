"""Every ``PreferenceDataModule`` argument checked when it is built, before any model or data is loaded.

A mistake raises :class:`~prefmodule.errors.ConfigError` naming the option, the value and what is allowed
(:class:`~prefmodule.errors.MissingFileError` for a file that is not there); the CLI prints it and exits 2.
"""

from __future__ import annotations

import os

from transformers import PreTrainedTokenizerBase

from prefmodule.data.formats import check_format_settings
from prefmodule.data.mixture import SourceGroup, parse_split
from prefmodule.data.sources import find_sources
from prefmodule.errors import ConfigError, MissingFileError
from prefmodule.paths import resolve


def check_arguments(hp, tokenizer) -> dict[str, list[SourceGroup]]:
    """Every argument checked before anything is loaded (ConfigError naming the option, the value and what is
    allowed; MissingFileError for a file that is not there); returns each split's source groups."""
    def at_least(name: str, value, low: int, why: str = "") -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise ConfigError(f"data.{name} must be an integer >= {low}{why}, got {value!r}")

    if not isinstance(hp.val_fraction, (int, float)) or not 0.0 <= hp.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in [0, 1), got {hp.val_fraction!r}")
    at_least("batch_size", hp.batch_size, 1)
    at_least("eval_batch_size", hp.eval_batch_size, 1)
    at_least("max_length", hp.max_length, 2, " (the prompt alone takes at least one token, e.g. BOS, and a "
                                              "response needs one more; typical values are 512 to 4096)")
    at_least("max_prompt_length", hp.max_prompt_length, 1)
    at_least("pad_to_multiple_of", hp.pad_to_multiple_of, 1)
    at_least("num_workers", hp.num_workers, 0)
    at_least("tokenize_workers", hp.tokenize_workers, 1)
    at_least("seed", hp.seed, 0)
    if hp.max_length is not None and hp.max_prompt_length is not None and hp.max_prompt_length >= hp.max_length:
        raise ConfigError(f"data.max_prompt_length ({hp.max_prompt_length}) must be below data.max_length "
                          f"({hp.max_length}), or no response would fit")
    for name, value, allowed in (("on_bad_rows", hp.on_bad_rows, ("error", "skip")),
                                 ("truncation_mode", hp.truncation_mode, ("keep_end", "keep_start")),
                                 ("pairs_from_ratings", hp.pairs_from_ratings, ("best_worst", "best_random"))):
        if value not in allowed:
            raise ConfigError(f"data.{name} must be one of {list(allowed)}, got {value!r}")
    for name in ("unpaired", "kl_completions", "group_by_length", "padding_free"):
        if getattr(hp, name) is not None and not isinstance(getattr(hp, name), bool):
            raise ConfigError(f"data.{name} must be true or false, got {getattr(hp, name)!r}")
    if tokenizer is not None and not isinstance(tokenizer, (str, PreTrainedTokenizerBase)):
        raise ConfigError(f"data.tokenizer must be a path, a hub id or a tokenizer, got {tokenizer!r}")
    check_format_settings(hp.format, hp.columns, hp.tags)
    template = hp.chat_template
    if template is not None and "{{" not in template and "{%" not in template and not _is_file(template):
        raise MissingFileError(f"data.chat_template: no such file {template!r} (give the Jinja template itself, "
                               "or the path of a file holding it)")
    groups = {}
    for split in ("train", "val", "test", "predict"):
        groups[split] = parse_split(getattr(hp, split), f"data.{split}") if getattr(hp, split) is not None else []
        for i, group in enumerate(groups[split]):
            option = f"data.{split}" + (f"[{i}]" if len(groups[split]) > 1 else "")
            settings = group.settings({"format": hp.format, "columns": hp.columns, "tags": hp.tags,
                                       "pairs_from_ratings": hp.pairs_from_ratings})
            check_format_settings(settings["format"], settings["columns"], settings["tags"], option)
            if settings["pairs_from_ratings"] not in ("best_worst", "best_random"):
                raise ConfigError(f"{option}.pairs_from_ratings must be 'best_worst' or 'best_random', got "
                                  f"{settings['pairs_from_ratings']!r}")
            if group.weight is not None and split != "train":
                raise ConfigError(f"{option}.weight: weights draw training epochs; evaluation reads every row of "
                                  "every source once, so give no weight there")
            find_sources(list(group.names), "train")  # a missing file fails now, before any model loads
    return groups


def _is_file(name: str) -> bool:
    try:
        return os.path.isfile(resolve(name))
    except FileNotFoundError:
        return False
