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
import json
import math
import numbers
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification

from prefmodule.errors import ConfigError, UserError
from prefmodule.models.loading import load_tokenizer
from prefmodule.paths import resolve
from prefmodule.training.checkpoints import checkpoint_class, checkpoint_problem, import_class

# The class of a reward model's checkpoint, imported by name when one is read: the objectives sit above sampling.
REWARD_MODULE = "prefmodule.objectives.reward.RewardModule"
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
        problem = reward_model_problem(location)
        if problem:
            raise ConfigError(f"model.reward={spec!r}: {problem}")
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
    except SyntaxError as error:
        raise ConfigError(f"model.reward={spec!r}: a syntax error at {error.filename}:{error.lineno}: "
                          f"{error.msg}") from None
    except (ImportError, AttributeError) as error:
        raise ConfigError(f"model.reward={spec!r}: cannot import it ({error})") from None
    except Exception as error:  # the module's own code failed as it was imported
        raise ConfigError(f"model.reward={spec!r}: importing it failed: {failure(error)}") from None
    if not callable(function):
        raise ConfigError(f"model.reward={spec!r}: {name} is not a function")
    return function


def reward_name(target: Callable | str) -> str:
    """A reward's name in metrics (``rewards/<name>/mean``), as TRL names it: a function's ``__name__``, a reward
    model's folder (or checkpoint file) name."""
    if isinstance(target, str):
        return Path(target.rstrip("/")).stem if target.endswith(".ckpt") else Path(target.rstrip("/")).name
    return getattr(target, "__name__", type(target).__name__)


def reward_model_problem(location: str) -> str | None:
    """Why the folder or ``.ckpt`` at ``location`` cannot be a reward model, read from its ``config.json`` or its
    checkpoint's hyperparameters without loading any weights; ``None`` when it can be one."""
    if location.endswith(".ckpt"):
        return _checkpoint_problem(location)
    if not os.listdir(location):
        return "the folder is empty (a RewardModule's export is its run's <log dir>/hf_model)"
    if not os.path.isfile(os.path.join(location, "config.json")):
        return ("no config.json in that folder: not a model (a RewardModule's export is its run's "
                "<log dir>/hf_model)")
    try:
        config = json.loads(Path(location, "config.json").read_text())
    except (OSError, ValueError) as error:
        return f"its config.json cannot be read ({error})"
    architectures = ", ".join(config.get("architectures") or []) or config.get("model_type", "this model")
    labels = len(config["id2label"]) if config.get("id2label") else config.get("num_labels", 2)  # transformers' 2
    if architectures.endswith("ForCausalLM"):
        return (f"{architectures} is a causal LM, not a reward model (one score per text: a sequence-classification "
                "head with one label, as configs/reward.yaml trains and exports)")
    if labels != 1:
        return f"{architectures} has {labels} labels; a reward model has one (a single score per text)"
    return None


def _checkpoint_problem(location: str) -> str | None:
    """Why a ``.ckpt`` cannot be read as a ``RewardModule``'s; ``None`` when it can."""
    reward_module = import_class(REWARD_MODULE)
    if os.path.isdir(location):
        return ("a sharded checkpoint (a folder): give the run's export (<log dir>/hf_model) or a one-file "
                "checkpoint (--trainer.strategy.save_distributed_checkpoint=false)")
    problem = checkpoint_problem(Path(location))
    if problem:
        return f"cannot be used: {problem}"
    saved = checkpoint_class(location)
    found = import_class(saved) if saved else reward_module
    if not isinstance(found, type) or not issubclass(found, reward_module):
        return (f"a checkpoint of {saved}, not of a RewardModule; a reward model is a RewardModule's checkpoint "
                "or export (configs/reward.yaml)")
    return None


class RewardError(UserError, ValueError):
    """A reward function's mistake on a batch of completions: it raised, or its answer is not one score (a finite
    int or float) per completion. The message reads ``reward function <name> <did> <which completions>: <why>``;
    ``completion`` is the completion at fault (``None``: the whole answer), and the message names the data rows
    once :meth:`locate` has them."""

    def __init__(self, function: Callable, did: str, why: str, count: int, completion: int | None = None):
        self.function, self.did, self.why, self.count, self.completion = function, did, why, count, completion
        self.rows: list[int] | None = None
        super().__init__(self.text())

    def locate(self, rows: list[int]) -> None:
        """Name ``rows`` in the message: the data row of each completion's prompt."""
        self.rows = rows
        self.args = (self.text(),)

    def text(self) -> str:
        return f"reward function {function_name(self.function)} {self.did} {self.where()}: {self.why}"

    def where(self) -> str:
        """Which completions: the one at fault (its row, and which of the row's), or the whole batch."""
        rows = self.rows
        if self.completion is None:
            return f"the {self.count} completions" + (f" of {_rows_text(rows)}" if rows else "")
        if not rows:
            return f"completion {self.completion + 1} of {self.count}"
        own = [k for k, row in enumerate(rows) if row == rows[self.completion]]
        return f"completion {own.index(self.completion) + 1} of {len(own)} of row {rows[self.completion]}"


@contextmanager
def naming_rows(rows: list[int], repeats: int) -> Iterator[None]:
    """A :class:`RewardError` raised inside names the data rows of the completions it judged: ``rows``, the
    prompts' rows, each with ``repeats`` completions (prompt after prompt)."""
    try:
        yield
    except RewardError as error:
        error.locate([row for row in rows for _ in range(repeats)])
        raise


def _rows_text(rows: list[int]) -> str:
    """``row 3``, ``rows 0-5`` (consecutive) or ``rows 0, 2, 7`` (at most ten named)."""
    distinct = list(dict.fromkeys(rows))
    if len(distinct) == 1:
        return f"row {distinct[0]}"
    if distinct == list(range(distinct[0], distinct[0] + len(distinct))):
        return f"rows {distinct[0]}-{distinct[-1]}"
    return "rows " + ", ".join(map(str, distinct[:10])) + (", ..." if len(distinct) > 10 else "")


def function_name(function: Callable) -> str:
    """``module:function`` or ``path/to/file.py:function``, as ``model.reward`` names it."""
    module = getattr(function, "__module__", None)
    if module not in sys.modules:  # imported from a file (not kept among the modules)
        try:
            module = inspect.getfile(function)
        except TypeError:
            module = module or "?"
    return f"{module}:{getattr(function, '__qualname__', type(function).__name__)}"


def failure(error: BaseException, function: Callable | None = None) -> str:
    """``Type: message (at file:line)``: the exception's first line and where it was raised, in ``function``'s
    own file when its traceback passes there (the reward's own code, not the library it called)."""
    frames = traceback.extract_tb(error.__traceback__)
    try:
        own = inspect.getfile(function) if function is not None else None
    except TypeError:  # a callable object, a builtin: no file of its own
        own = None
    frame = next((f for f in reversed(frames) if f.filename == own), frames[-1] if frames else None)
    first = (str(error).strip().splitlines() or [""])[0]
    text = f"{type(error).__name__}: {first}" if first else type(error).__name__
    return text + (f" (at {frame.filename}:{frame.lineno})" if frame else "")


def _check_signature(function: Callable) -> None:
    """Refuse a function that cannot be called as ``function(prompts, completions, **columns)``: the parameters
    after the first two that have no default are the data columns it reads (``answer``), passed by keyword."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):  # no signature to read: its call will tell
        return
    columns = [p.name for p in list(signature.parameters.values())[2:] if p.default is p.empty
               and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    try:
        signature.bind([], [], **dict.fromkeys(columns))
    except TypeError as error:
        raise ConfigError(f"model.reward: reward function {function_name(function)}{signature} cannot be called "
                          f"as function(prompts, completions) ({error})") from None


def checked_scores(answer, count: int, function: Callable, allow_none: bool = False) -> list[float]:
    """A reward function's ``answer`` for ``count`` completions as floats, checked as a whole: a list (or tuple,
    array, tensor) of ``count`` finite ints or floats (not bools); with ``allow_none``, ``None`` for a completion
    it cannot judge (NaN here). Else a :class:`RewardError` saying what was wrong."""
    if hasattr(answer, "tolist") and not isinstance(answer, (str, bytes)):
        answer = answer.tolist()  # a NumPy array, a tensor
    if not isinstance(answer, (list, tuple)):
        raise RewardError(function, f"returned {_shown(answer)} for", "it must return a list of scores, one per "
                          "completion", count)
    if len(answer) != count:
        raise RewardError(function, f"returned {len(answer)} scores for", "it must return one score per completion",
                          count)
    scores = []
    for k, score in enumerate(answer):
        if score is None and allow_none:
            scores.append(math.nan)
            continue
        if not isinstance(score, numbers.Real) or isinstance(score, bool):
            allowed = "an int or a float, or None for a completion it cannot judge" if allow_none else \
                "an int or a float"
            raise RewardError(function, f"returned {_shown(score)} for", f"a score is {allowed}", count, k)
        if not math.isfinite(score):
            raise RewardError(function, f"returned {score} for", "a score must be finite", count, k)
        scores.append(float(score))
    return scores


def _shown(value) -> str:
    """A value and its type, short: ``'1' (str)``."""
    text = repr(value)
    return f"{text if len(text) <= 40 else text[:39] + '…'} ({type(value).__name__})"


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
        _check_signature(function)
        self.takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
        self.named = {p.name for p in parameters if p.kind is not inspect.Parameter.VAR_POSITIONAL}

    def __call__(self, prompts: list, completions: list[str], **columns) -> list[float]:
        keywords = columns if self.takes_all else {k: v for k, v in columns.items() if k in self.named}
        try:
            answer = self.function(prompts, completions, **keywords)
        except Exception as error:
            raise RewardError(self.function, "failed on", failure(error, self.function), len(completions)) from error
        return checked_scores(answer, len(completions), self.function, self.allow_none)


class RewardModelScorer:
    """A reward model scoring ``prompt + completion``: a text prompt with the completion and EOS (special tokens
    as the tokenizer adds them), a chat prompt rendered with the completion as the assistant's turn, as
    ``RewardModule`` trained on them; the score is read at the last token that is not padding."""

    def __init__(self, location: str, device: torch.device | str = "cpu", batch_size: int = 16):
        if location.endswith(".ckpt"):
            reward_module = import_class(REWARD_MODULE)
            checkpoint = torch.load(location, map_location="cpu", weights_only=True)
            settings = {k: v for k, v in checkpoint["hyper_parameters"].items() if not k.startswith("_")}
            module = reward_module(**settings)
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
