"""What scores a completion: a reward model (a ``RewardModule`` export or checkpoint, or any one-label
``AutoModelForSequenceClassification`` folder) or a Python function (a verifiable reward, a rule).

A scorer is called with the prompts (texts or chat messages, as the data holds them) and the completions (texts)
and returns one float per completion. A function also receives, as keyword arguments, the rows' other columns
(one list each, aligned with the completions) and ``completion_ids``, as TRL calls reward functions: all of them
when it takes ``**kwargs``, else those it names.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification

from prefmodule.errors import ConfigError
from prefmodule.models.loading import load_tokenizer
from prefmodule.paths import resolve

Scorer = Callable[..., list[float]]  # (prompts, completions, **columns) -> one float per completion


def scorer_target(spec: str) -> Callable | str:
    """What ``spec`` names, checked: the function of ``package.module:function`` or ``path/to/file.py:function``,
    or the location of a reward model (a folder, or a ``.ckpt`` of a ``RewardModule`` fit)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"model.reward={spec!r}: give a reward model (a folder or a RewardModule .ckpt) or a "
                          "function as module:function")
    location = resolve(spec)
    if os.path.isdir(location) or location.endswith(".ckpt"):
        if not os.path.exists(location):
            raise ConfigError(f"model.reward={spec!r}: no such checkpoint")
        return location
    module, _, name = spec.rpartition(":")
    if not module or not name:
        raise ConfigError(f"model.reward={spec!r}: not a folder, a .ckpt, or a function as module:function "
                          "(e.g. prefmodule.sampling.rules:politeness)")
    return _function(module, name, spec)


def make_scorer(spec: str, device: torch.device | str = "cpu") -> Scorer:
    """The scorer ``spec`` names (:func:`scorer_target`): a function called as ``function(prompts, completions) ->
    list[float]``, or a reward model loaded on ``device``."""
    target = scorer_target(spec)
    return RewardModelScorer(target, device) if isinstance(target, str) else FunctionScorer(target)


def _function(module: str, name: str, spec: str) -> Callable:
    try:
        if module.endswith(".py"):
            loaded = importlib.util.spec_from_file_location(Path(module).stem, module)
            if loaded is None or not Path(module).is_file():
                raise ImportError(f"no such file {module}")
            code = importlib.util.module_from_spec(loaded)
            loaded.loader.exec_module(code)
        else:
            code = importlib.import_module(module)
        function = getattr(code, name)
    except (ImportError, AttributeError) as error:
        raise ConfigError(f"model.reward={spec!r}: cannot import it ({error})") from None
    if not callable(function):
        raise ConfigError(f"model.reward={spec!r}: {name} is not a function")
    return function


def reward_name(target: Callable | str) -> str:
    """A reward's name in metrics (``rewards/<name>/mean``), as TRL names it: a function's ``__name__``, a reward
    model's folder (or checkpoint file) name."""
    if isinstance(target, str):
        return Path(target.rstrip("/")).stem if target.endswith(".ckpt") else Path(target.rstrip("/")).name
    return getattr(target, "__name__", type(target).__name__)


class FunctionScorer:
    """A Python function ``(prompts, completions, **columns) -> list[float]``, its answer checked: one finite
    float per completion, or with ``allow_none`` ``None`` for a completion it cannot judge (NaN in the scores).

    Keyword columns reach it all when it takes ``**kwargs``, else only those it names (``answer``, ...)."""

    def __init__(self, function: Callable, allow_none: bool = False):
        self.function = function
        self.allow_none = allow_none
        try:
            parameters = inspect.signature(function).parameters.values()
        except (TypeError, ValueError):  # a callable without a signature to read: no keyword columns
            parameters = []
        self.takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
        self.named = {p.name for p in parameters if p.kind is not inspect.Parameter.VAR_POSITIONAL}

    def __call__(self, prompts: list, completions: list[str], **columns) -> list[float]:
        keywords = columns if self.takes_all else {k: v for k, v in columns.items() if k in self.named}
        answer = self.function(prompts, completions, **keywords)
        scores = [math.nan if score is None and self.allow_none else float(score) for score in answer]
        finite = all(math.isfinite(score) or (self.allow_none and math.isnan(score)) for score in scores)
        if len(scores) != len(completions) or not finite:
            raise ValueError(f"the reward function {reward_name(self.function)} gave "
                             f"{len(scores)} scores for {len(completions)} completions, or a non-finite one")
        return scores


class RewardModelScorer:
    """A reward model scoring ``prompt + completion``: a text prompt with the completion and EOS (special tokens
    as the tokenizer adds them), a chat prompt rendered with the completion as the assistant's turn, as
    ``RewardModule`` trained on them; the score is read at the last token that is not padding."""

    def __init__(self, location: str, device: torch.device | str = "cpu", batch_size: int = 16):
        if location.endswith(".ckpt"):
            from prefmodule.objectives.reward import RewardModule  # here: the objectives import this module

            checkpoint = torch.load(location, map_location="cpu", weights_only=True)
            settings = {k: v for k, v in checkpoint["hyper_parameters"].items() if not k.startswith("_")}
            module = RewardModule(**settings, export_hf=False)
            module.configure_model()
            module.load_state_dict(checkpoint["state_dict"])
            self.model, self.tokenizer = module.policy, module.tokenizer
        else:
            self.tokenizer = load_tokenizer(location)  # right-padded, a pad token (EOS if none)
            self.model = AutoModelForSequenceClassification.from_pretrained(location)
        if self.model.config.num_labels != 1:
            raise ConfigError(f"model.reward={location!r} has {self.model.config.num_labels} labels; a reward model "
                              "has one")
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model = self.model.to(device).eval().requires_grad_(False)
        self.batch_size = batch_size

    def __call__(self, prompts: list, completions: list[str], **columns) -> list[float]:
        scores = []
        for start in range(0, len(completions), self.batch_size):
            texts = [self.text(prompt, completion) for prompt, completion in
                     zip(prompts[start:start + self.batch_size], completions[start:start + self.batch_size])]
            chat = not isinstance(prompts[start], str)
            inputs = self.tokenizer(texts, add_special_tokens=not chat, padding=True, return_tensors="pt")
            with torch.no_grad():
                logits = self.model(**inputs.to(self.model.device)).logits
            scores += logits[:, 0].float().tolist()
        return scores

    def text(self, prompt: str | list, completion: str) -> str:
        if isinstance(prompt, str):
            eos = self.tokenizer.eos_token
            return prompt + completion + ("" if completion.endswith(eos) else eos)
        return self.tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": completion}],
                                                  tokenize=False)
