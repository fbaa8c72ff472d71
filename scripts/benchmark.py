"""Speed and memory of prefmodule's DPO, ORPO and SimPO side by side with TRL and with the compute floor.

One randomly initialised model (saved once, so both frameworks load identical weights) and one set
of synthetic, pre-tokenised pairs with log-normal prompt and response lengths; every
(framework, objective) run trains the same batches in the same order, in a fresh subprocess so
its peak memory is its own:

    python scripts/benchmark.py --json benchmark.json --markdown BENCHMARKS.md
    python scripts/benchmark.py --device cuda --preset qwen2-0.5b --dtype bf16 --max-length 2048
    python scripts/benchmark.py --model smollm2 --data sharegpt --objectives dpo --batch-size 4 --max-length 1024

``--model`` takes a pretrained folder (``smollm2``: SmolLM2-135M-Instruct from the package index, see
``scripts/real_assets.py``) instead of a random model; ``--data sharegpt`` real conversations (ShareGPT) as
pairs, tokenised by ``PreferenceDataModule`` with the model's tokenizer and chat template, in file order.

Per run: median step time after warm-up (the wall time between consecutive optimizer steps, data
loading and logging included), tokens/s over non-pad tokens, peak memory (process RSS on CPU,
``torch.cuda.max_memory_allocated`` on GPU), the ratios prefmodule / TRL, and the compute floor:
the model FLOPs of the non-pad tokens (3 forwards for the trained policy, 1 for a live
reference) over the matmul throughput measured in the same run.

``--objectives grpo`` (on its own, with ``--model``) measures GRPO against TRL's ``GRPOTrainer`` instead: the
same pretrained model, the first prompts of ``--prompts`` (default: the arithmetic asset) in file order,
``--batch-size`` prompts per step, ``--num-generations`` completions of each (KV-cached ``generate``, no vLLM) of
at most ``--max-completion-length`` tokens at ``--temperature``, the exact-match reward, beta 0 and loss_type dapo
in both, one generation batch per optimizer step. Per run: the median step time and CPU time, the completion
tokens sampled per timed step and the time per sampled token (completion lengths differ between the runs, as
their samples do), peak memory, the ratios prefmodule / TRL:

    python scripts/benchmark.py --model smollm2 --objectives grpo --num-generations 8 --batch-size 4 \
        --max-completion-length 64 --steps 3 --warmup-steps 1 --json grpo.json --markdown BENCHMARKS.md

``--markdown FILE`` rewrites only the part of FILE between the markers of ``--section`` (default ``results``,
``grpo`` for ``--objectives grpo``; or appends it), so the analysis written around the tables survives a re-run.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata, util
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = REPO_ROOT / "prefmodule" / "assets" / "tiny-llama"  # pad 0, BOS 1, EOS 2: only its special ids are used
EOS_ID = 2
FRAMEWORKS = ("prefmodule", "trl")
PAIR_OBJECTIVES = ("dpo", "orpo", "simpo")  # trained on the pairs; the default
OBJECTIVES = (*PAIR_OBJECTIVES, "grpo")  # grpo: on prompts, sampling each step; measured on its own
TRL_OBJECTIVES = ("dpo", "orpo", "grpo")  # TRL's DPOTrainer, ORPOTrainer and GRPOTrainer

PRESETS = {
    "small-llama": dict(
        model_type="llama", vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False,
    ),
    "qwen2-0.5b": dict(
        model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6,
    ),
}
# The issue's targets at the default shape (small-llama, fp32, 2-core CPU): upper bounds of the ratios.
TARGETS = {
    ("dpo", "time_vs_trl"): 0.25, ("dpo", "memory_vs_trl"): 0.4,
    ("orpo", "time_vs_trl"): 0.35, ("orpo", "memory_vs_trl"): 0.5,
    ("dpo", "time_vs_floor"): 3.0,
}
# Issue 29's goal for GRPO, judged on SmolLM2-135M-Instruct (``--model smollm2``): upper bounds of the ratios.
GRPO_TARGETS = {"time_vs_trl": 0.5, "time_per_token_vs_trl": 0.5, "memory_vs_trl": 0.6}


@dataclass
class Settings:
    preset: str = "small-llama"
    model: str | None = None  # a pretrained folder ("smollm2": SmolLM2-135M-Instruct) instead of the preset
    data: str = "synthetic"  # or "sharegpt": real conversational pairs
    model_overrides: dict = field(default_factory=dict)  # config fields laid over the preset
    steps: int = 10  # timed optimizer steps
    warmup_steps: int = 2  # untimed steps before them (at least 1: a timed step starts where one ended)
    batch_size: int = 8  # pairs per step
    max_length: int = 512
    device: str = "cpu"
    dtype: str = "fp32"  # "bf16": mixed precision over float32 weights, in both frameworks
    gradient_checkpointing: bool = False
    objectives: list[str] = field(default_factory=lambda: list(PAIR_OBJECTIVES))
    frameworks: list[str] = field(default_factory=lambda: list(FRAMEWORKS))
    lr: float = 1e-6
    max_grad_norm: float = 1.0  # TRL's default; Lightning's ``gradient_clip_val``
    logps_chunk_size: int | None = None  # passed to prefmodule modules that accept it
    compile_layers: bool = False  # prefmodule modules' compile_layers (torch.compile of the decoder layers)
    checkpoint_mlp: bool = False  # prefmodule modules' gradient_checkpointing: mlp
    padding_free: str = "auto"  # prefmodule's batches: auto (its default: packed when the model allows), on, off
    reference: str | None = None  # prefmodule DPO's ``reference=``; "precomputed" also in TRL
    seed: int = 0
    repeats: int = 1  # runs of each (framework, objective), interleaved; the fastest is kept
    # grpo only (batch_size counts prompts per step there):
    prompts: str = "asset://arithmetic/train.jsonl"  # a JSONL of prompts, with the reward's columns (answer)
    reward: str = "prefmodule.sampling.rules:exact_match"  # module:function, given to both frameworks
    num_generations: int = 8  # G, completions per prompt
    max_completion_length: int = 64
    temperature: float = 0.7

    def model_config(self) -> dict:
        if self.model:
            return json.loads(Path(pretrained_folder(self.model), "config.json").read_text())
        return {**PRESETS[self.preset], **self.model_overrides, "max_position_embeddings": self.max_length}


def pretrained_folder(model: str) -> str:
    if model != "smollm2":
        from prefmodule.paths import resolve

        return resolve(model)  # asset://tiny-llama, ~/..., or a folder
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    from real_assets import smollm2_folder

    return smollm2_folder()


# ----- model and data ------------------------------------------------------------------------------
def build_model(settings: Settings, directory: Path) -> int:
    """Save a seeded random-init causal LM and the tokenizer whose special ids the data uses; return its size."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()
    config = dict(settings.model_config())
    config = AutoConfig.for_model(config.pop("model_type"), pad_token_id=0, bos_token_id=1, eos_token_id=EOS_ID,
                                  **config)
    torch.manual_seed(settings.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(TOKENIZER).save_pretrained(directory)
    return sum(p.numel() for p in model.parameters())


def synthetic_pairs(count: int, vocab_size: int, max_length: int, seed: int) -> list[dict]:
    """Pre-tokenised pairs with log-normal (right-skewed) lengths: median prompt 12% and median response
    18% of ``max_length``, long tails cut so that ``prompt + response`` fits; responses end in EOS."""
    rng = random.Random(seed)

    def length(median: float, sigma: float, low: int, high: int) -> int:
        return min(high, max(low, round(rng.lognormvariate(math.log(median), sigma))))

    def tokens(n: int) -> list[int]:
        return [rng.randrange(3, vocab_size) for _ in range(n)]

    pairs = []
    for index in range(count):
        prompt = length(0.12 * max_length, 0.8, 4, max_length // 2)
        room = max_length - prompt
        chosen, rejected = (length(0.18 * max_length, 0.7, 2, room) for _ in range(2))
        pairs.append({"index": index, "prompt_ids": tokens(prompt),
                      "chosen_ids": tokens(chosen - 1) + [EOS_ID], "rejected_ids": tokens(rejected - 1) + [EOS_ID]})
    return pairs


def sharegpt_pairs(count: int, model_dir: str, max_length: int) -> list[dict]:
    """The first ``count`` ShareGPT conversational pairs (of 1,000) that ``PreferenceDataModule`` keeps, tokenised as
    prefmodule trains on them (the model's chat template; prompts cut to half of ``max_length``, keeping their end,
    responses to the rest), in file order."""
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    from real_assets import sharegpt_pairs as fetch_pairs

    from prefmodule import PreferenceDataModule

    with tempfile.TemporaryDirectory() as cache:
        data = PreferenceDataModule(train=fetch_pairs(max(count, 1000)), tokenizer=model_dir, max_length=max_length,
                                    max_prompt_length=max_length // 2, cache_dir=cache, tokenize_workers=1)
        data.setup("fit")
        dataset = data.datasets["train"]
        return [dataset[i] for i in range(count)]


def batches(pairs: list[dict], batch_size: int) -> list[list[dict]]:
    return [pairs[i: i + batch_size] for i in range(0, len(pairs), batch_size)]


# ----- compute floor ------------------------------------------------------------------------------
def forward_flops(config: dict, pairs: list[dict], scored_head_only: bool = False) -> float:
    """FLOPs of one forward over the non-pad tokens of ``pairs`` (chosen and rejected sequences).

    ``2 * matmul params * tokens`` for the linear layers and LM head, plus causal attention
    ``2 * layers * q_dim * L^2`` per sequence of length ``L``. ``scored_head_only`` counts the LM
    head only at positions whose next token is scored (a response token), as a fused head does.
    """
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    q_dim, kv_dim = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    layer_params = hidden * (2 * q_dim + 2 * kv_dim) + 3 * hidden * config["intermediate_size"]
    head_params = hidden * config["vocab_size"]
    flops = 0.0
    for pair in pairs:
        prompt = len(pair["prompt_ids"])
        for response in (len(pair["chosen_ids"]), len(pair["rejected_ids"])):
            length = prompt + response
            head_positions = response if scored_head_only else length
            flops += 2 * (layer_params * layers * length + head_params * head_positions)
            flops += 2 * layers * q_dim * length**2
    return flops


def step_flops(config: dict, pairs: list[dict], live_reference: bool, scored_head_only: bool = False) -> float:
    """Policy forward + backward (3 forwards), plus one forward of a live reference."""
    return (3 + live_reference) * forward_flops(config, pairs, scored_head_only)


def matmul_throughput(device: str, dtype: torch.dtype, size: int | None = None, repeats: int = 5) -> float:
    """Best FLOP/s of a large square ``torch.mm`` on ``device``."""
    size = size or (8192 if device == "cuda" else 2048)
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    best = math.inf
    for _ in range(repeats + 1):  # the first call warms up
        sync(device)
        start = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ----- one run, in its own process ------------------------------------------------------------------
def current_memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.memory_allocated() / 2**20
    with open("/proc/self/statm") as handle:  # resident pages
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def layout(run: dict) -> str:
    """`` (packed)`` or `` (padded)`` after prefmodule's name in the tables; nothing after TRL's."""
    if "packed" not in run:
        return ""
    return " (packed)" if run["packed"] else " (padded)"


def peak_memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def non_pad_tokens(batch) -> int:
    """Tokens that are not padding, in a prefmodule batch (padded or packed) or a TRL batch (a dict; ORPO's has
    chosen/rejected masks)."""
    if not isinstance(batch, dict):
        return batch.tokens()
    masks = ("attention_mask", "chosen_attention_mask", "rejected_attention_mask")
    return sum(int(batch[key].sum()) for key in masks if key in batch)


class CountingCollator:
    """Wraps a collator and appends the non-pad tokens of every batch it builds to ``tokens``."""

    def __init__(self, collate, tokens: list[int]):
        self.collate = collate
        self.tokens = tokens

    def __call__(self, examples):
        batch = self.collate(examples)
        self.tokens.append(non_pad_tokens(batch))
        return batch


class StepRecorder:
    """The wall-clock end of every optimizer step; with ``profile_path``, a torch profile of the timed steps
    (op tables sorted by self CPU time, then by op and input shape; profiling slows the steps it records)."""

    def __init__(self, settings: Settings, profile_path: Path | None = None):
        self.settings = settings
        self.profile_path = profile_path
        self.profiler = None
        self.ends: list[float] = []
        self.cpu_ends: list[float] = []  # process CPU time, all threads: less disturbed by a busy machine
        self.tokens: list[int] = []

    def started(self, step: int) -> None:
        if self.profile_path and step == self.settings.warmup_steps:
            self.profiler = torch.profiler.profile(record_shapes=True, profile_memory=True)
            self.profiler.start()

    def ended(self, tokens: int | None = None) -> None:
        sync(self.settings.device)
        self.ends.append(time.perf_counter())
        self.cpu_ends.append(time.process_time())
        if tokens is not None:
            self.tokens.append(tokens)
        if self.profiler and len(self.ends) == self.settings.warmup_steps + self.settings.steps:
            self.profiler.stop()
            tables = [self.profiler.key_averages(group_by_input_shape=by_shape).table(
                sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=70) for by_shape in (False, True)]
            self.profile_path.parent.mkdir(parents=True, exist_ok=True)
            self.profile_path.write_text("\n\n".join(tables))


def accepted_knobs(cls, knobs: dict) -> dict:
    """The knobs that were set, if ``cls`` accepts them; a set knob it does not know is an error."""
    parameters = inspect.signature(cls.__init__).parameters
    unknown = [name for name, value in knobs.items() if value is not None and name not in parameters]
    if unknown:
        raise SystemExit(f"{cls.__name__} has no argument {unknown}: this prefmodule cannot measure it")
    return {name: value for name, value in knobs.items() if value is not None}


def measurements(steps: StepRecorder, baseline_mb: float, total_s: float, settings: Settings) -> dict:
    expected = settings.warmup_steps + settings.steps
    if len(steps.ends) != expected:
        raise RuntimeError(f"timed {len(steps.ends)} steps, expected {expected}")

    def timed(ends: list[float]) -> list[float]:
        return [b - a for a, b in zip(ends[settings.warmup_steps - 1:], ends[settings.warmup_steps:])]

    return {
        "step_times_s": timed(steps.ends),
        "step_cpu_times_s": timed(steps.cpu_ends),
        "batch_tokens": steps.tokens[:expected],
        "peak_memory_mb": peak_memory_mb(settings.device),
        "memory_at_start_mb": baseline_mb,
        "total_s": total_s,  # from building the trainer to the end of training: loading, any precompute, all steps
    }


def run_prefmodule(objective: str, settings: Settings, model_dir: str, pairs: list[dict],
                   profile_dir: str | None = None) -> dict:
    """Train ``settings.warmup_steps + settings.steps`` steps of the real module with a real Lightning Trainer."""
    import lightning as L
    from torch.utils.data import DataLoader

    from prefmodule import DPOModule, ORPOModule, SimPOModule
    from prefmodule.data.collate import PreferenceCollator
    from prefmodule.training.fit_end import ExportModel

    class Pairs(L.LightningDataModule):
        """The pairs in their order, through a datamodule (where a precomputed reference reads them)."""

        def __init__(self, pad_token_id: int):
            super().__init__()
            self.pad_token_id = pad_token_id

        def train_dataloader(self):
            # "auto" packs as PreferenceDataModule(padding_free=None) does: when the module's models allow it.
            packs = {"on": True, "off": None, "auto": getattr(self.trainer.lightning_module, "packed_attention", None)}
            packing = accepted_knobs(PreferenceCollator, {"padding_free": packs[settings.padding_free] or None})
            collate = PreferenceCollator(self.pad_token_id, **packing)
            return DataLoader(pairs, batch_size=settings.batch_size, shuffle=False, collate_fn=collate)

    steps = StepRecorder(settings, profile_dir and Path(profile_dir, f"prefmodule-{objective}.txt"))

    class StepClock(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            steps.started(batch_idx)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            steps.ended(non_pad_tokens(batch))
            self.packed = batch.sequences.packed

    clock = StepClock()

    baseline, start = current_memory_mb(settings.device), time.perf_counter()
    module_class = {"dpo": DPOModule, "orpo": ORPOModule, "simpo": SimPOModule}[objective]
    with tempfile.TemporaryDirectory() as cache_dir:
        knobs = {"logps_chunk_size": settings.logps_chunk_size}
        if objective == "dpo":
            knobs["reference"] = settings.reference
            knobs["ref_cache_dir"] = cache_dir if settings.reference == "precomputed" else None  # computed, not reused
        module = module_class(model=model_dir, lr=settings.lr, warmup=0,
                              gradient_checkpointing="mlp" if settings.checkpoint_mlp else settings.gradient_checkpointing,
                              **({"compile_layers": True} if settings.compile_layers else {}),  # the base's option
                              **accepted_knobs(module_class, knobs))
        trainer = L.Trainer(
            accelerator=settings.device, devices=1, precision="bf16-mixed" if settings.dtype == "bf16" else "32-true",
            max_steps=settings.warmup_steps + settings.steps, gradient_clip_val=settings.max_grad_norm or None,
            logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            callbacks=[clock, ExportModel(enabled=False)],
        )
        trainer.fit(module, datamodule=Pairs(module.tokenizer.pad_token_id))
    return {**measurements(steps, baseline, time.perf_counter() - start, settings), "packed": clock.packed}


def run_trl(objective: str, settings: Settings, model_dir: str, pairs: list[dict], profile_dir: str | None = None) -> dict:
    """The same steps with TRL's DPOTrainer or ORPOTrainer, skipping only their text tokenisation."""
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback

    if objective == "dpo":
        from trl import DPOConfig as Config
        from trl import DPOTrainer

        class Trainer(DPOTrainer):
            def _prepare_dataset(self, dataset, *args, **kwargs):
                return dataset  # already holds prompt_ids / chosen_ids / rejected_ids

        extra = dict(precompute_ref_log_probs=settings.reference == "precomputed")
    else:
        from trl.experimental.orpo import ORPOConfig as Config
        from trl.experimental.orpo import ORPOTrainer

        class Trainer(ORPOTrainer):
            def tokenize_row(self, feature, model=None):
                prompt = feature["prompt_ids"]
                row = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
                for key in ("chosen", "rejected"):
                    response = feature[f"{key}_ids"]
                    row[f"{key}_input_ids"] = prompt + response
                    row[f"{key}_attention_mask"] = [1] * (len(prompt) + len(response))
                    row[f"{key}_labels"] = [-100] * len(prompt) + response
                return row

        extra = {}
    baseline, start = current_memory_mb(settings.device), time.perf_counter()
    steps = StepRecorder(settings, profile_dir and Path(profile_dir, f"trl-{objective}.txt"))

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            steps.started(state.global_step)

        def on_step_end(self, args, state, control, **kwargs):
            steps.ended()

    with tempfile.TemporaryDirectory() as output_dir:
        args = Config(
            output_dir=output_dir, per_device_train_batch_size=settings.batch_size, learning_rate=settings.lr,
            max_steps=settings.warmup_steps + settings.steps, max_length=settings.max_length,
            max_grad_norm=settings.max_grad_norm, bf16=settings.dtype == "bf16",
            gradient_checkpointing=settings.gradient_checkpointing, use_cpu=settings.device == "cpu",
            train_sampling_strategy="sequential", report_to="none", save_strategy="no", disable_tqdm=True,
            seed=settings.seed, beta=0.1, **extra,
        )
        trainer = Trainer(
            model=model_dir, args=args, processing_class=AutoTokenizer.from_pretrained(model_dir),
            train_dataset=Dataset.from_list([{k: v for k, v in p.items() if k != "index"} for p in pairs]),
            callbacks=[StepClock()],
        )
        trainer.data_collator = CountingCollator(trainer.data_collator, steps.tokens)  # after any precompute pass
        trainer.train()
    return measurements(steps, baseline, time.perf_counter() - start, settings)


# ----- GRPO: prompts, completions sampled every step -------------------------------------------------------------
def read_jsonl(path: str) -> list[dict]:
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def reward_function(spec: str):
    """The reward ``module:function``, called as both frameworks call it: prefmodule with the completions as texts,
    TRL (for conversational prompts) with each completion as a list of messages, so TRL's call is given the last
    message's text. TRL's own keyword arguments (``trainer_state``, ``log_extra``, ...) are not passed on: the
    function gets what prefmodule gives it, the prompts, the texts, ``completion_ids`` and the rows' columns."""
    import importlib

    module, name = spec.split(":")
    function = getattr(importlib.import_module(module), name)

    def reward(prompts, completions, **columns):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        columns = {k: v for k, v in columns.items()
                   if k not in ("trainer_state", "log_extra", "log_metric", "environments")}
        return function(prompts, texts, **columns)

    reward.__name__ = name  # TRL logs it as rewards/<name>/mean
    return reward


def prefmodule_top_k(model_dir: str) -> int:
    """The top-k prefmodule samples with: it does not set one, so ``generate`` takes the model's generation config's,
    else transformers' default (50). TRL sets its own (``top_k``, default 0: none); the benchmark gives TRL this one."""
    from transformers import GenerationConfig

    try:
        configured = GenerationConfig.from_pretrained(model_dir).top_k
    except OSError:  # no generation_config.json
        configured = None
    return 50 if configured is None else configured


def grpo_measurements(steps: StepRecorder, baseline_mb: float, total_s: float, settings: Settings,
                      record: dict) -> dict:
    """The step clock's figures, and per step: the prompts' ids (each prompt once), every completion's length (the
    tokens sampled, up to and including the end token) and the sampled tokens the framework logged."""
    result = measurements(steps, baseline_mb, total_s, settings)
    expected = settings.warmup_steps + settings.steps
    for key in ("prompt_ids", "completion_lengths"):
        if len(record[key]) != expected:
            raise RuntimeError(f"recorded {len(record[key])} generation batches, expected {expected}")
    counted = [sum(lengths) for lengths in record["completion_lengths"]]
    if any(abs(logged - count) > 0.5 for logged, count in zip(record["logged_tokens"], counted)):
        raise RuntimeError(f"logged sampled tokens {record['logged_tokens']} differ from the completions' {counted}")
    packed = {"packed": record["packed"]} if "packed" in record else {}  # prefmodule's layout, in the tables
    return {**result, "prompt_ids": record["prompt_ids"], "completion_lengths": record["completion_lengths"],
            "sampled_tokens": [round(t) for t in record["logged_tokens"]], **packed}


def run_prefmodule_grpo(settings: Settings, model_dir: str, prompts_path: str, profile_dir: str | None = None) -> dict:
    """``GRPOModule`` on the prompts in file order, with a real Lightning Trainer."""
    import lightning as L
    from torch.utils.data import DataLoader

    from prefmodule import GRPOModule, PreferenceDataModule
    from prefmodule.training.callbacks import SampleWriter
    from prefmodule.training.fit_end import ExportModel

    record = {"prompt_ids": [], "completion_lengths": [], "logged_tokens": []}

    class FileOrder(PreferenceDataModule):
        """The prompts in file order, as TRL's ``shuffle_dataset=False`` (the datamodule shuffles training rows)."""

        def train_dataloader(self):
            return DataLoader(self._split("train"), batch_size=self.hparams.batch_size, shuffle=False,
                              collate_fn=self.collator())

    class Recorded(GRPOModule):
        def sample_rollout(self, batch):
            rollout = super().sample_rollout(batch)
            if self.training:
                record["prompt_ids"].append([[int(t) for t in ids] for ids in batch.prompt_ids])
                record["completion_lengths"].append([int(n) for n in rollout.values["completions/mean_length"]])
                record["packed"] = rollout.sequences.packed
            return rollout

    steps = StepRecorder(settings, profile_dir and Path(profile_dir, "prefmodule-grpo.txt"))

    class StepClock(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            steps.started(batch_idx)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            steps.ended()
            total = float(trainer.callback_metrics["train/sampled_tokens"])  # cumulative, as logged
            record["logged_tokens"].append(total - sum(record["logged_tokens"]))

    baseline, start = current_memory_mb(settings.device), time.perf_counter()
    with tempfile.TemporaryDirectory() as cache_dir:
        module = Recorded(
            model=model_dir, reward=settings.reward, num_generations=settings.num_generations,
            max_new_tokens=settings.max_completion_length, temperature=settings.temperature, loss_type="dapo",
            beta=0.0, lr=settings.lr, warmup=0,
            gradient_checkpointing=settings.gradient_checkpointing,
            **accepted_knobs(GRPOModule, {"logps_chunk_size": settings.logps_chunk_size}),
        )
        packing = {"on": True, "off": False, "auto": None}[settings.padding_free]
        data = FileOrder(train=prompts_path, batch_size=settings.batch_size, max_length=settings.max_length,
                         cache_dir=cache_dir, padding_free=packing)
        trainer = L.Trainer(
            accelerator=settings.device, devices=1, precision="bf16-mixed" if settings.dtype == "bf16" else "32-true",
            max_steps=settings.warmup_steps + settings.steps, gradient_clip_val=settings.max_grad_norm or None,
            accumulate_grad_batches=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, num_sanity_val_steps=0,
            callbacks=[StepClock(), ExportModel(enabled=False), SampleWriter(num_prompts=0)],
        )
        trainer.fit(module, datamodule=module.connect(data))
    return grpo_measurements(steps, baseline, time.perf_counter() - start, settings, record)


def run_trl_grpo(settings: Settings, model_dir: str, prompts_path: str, profile_dir: str | None = None) -> dict:
    """TRL's ``GRPOTrainer`` on the same prompts, in file order, one generation batch per optimizer step."""
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    G = settings.num_generations
    record = {"prompt_ids": [], "completion_lengths": [], "logged_tokens": []}

    class Trainer(GRPOTrainer):
        def _generate(self, prompts):
            generated = super()._generate(prompts)
            prompt_ids, completion_ids = generated[0], generated[1]  # one row per completion, a prompt's G together
            if self.model.training:
                record["prompt_ids"].append([[int(t) for t in ids] for ids in prompt_ids[::G]])
                record["completion_lengths"].append([len(ids) for ids in completion_ids])
            return generated

    baseline, start = current_memory_mb(settings.device), time.perf_counter()
    steps = StepRecorder(settings, profile_dir and Path(profile_dir, "trl-grpo.txt"))

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            steps.started(state.global_step)

        def on_step_end(self, args, state, control, **kwargs):
            steps.ended()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:  # logging_steps=1: this step's generation batch
                record["logged_tokens"].append(logs["completions/mean_length"] * settings.batch_size * G)

    with tempfile.TemporaryDirectory() as output_dir:
        args = GRPOConfig(
            output_dir=output_dir, per_device_train_batch_size=settings.batch_size * G,  # completions per step
            gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1, num_generations=G,
            max_completion_length=settings.max_completion_length, temperature=settings.temperature, top_p=1.0,
            top_k=prefmodule_top_k(model_dir), beta=0.0, loss_type="dapo", learning_rate=settings.lr,
            max_steps=settings.warmup_steps + settings.steps, max_grad_norm=settings.max_grad_norm,
            bf16=settings.dtype == "bf16", gradient_checkpointing=settings.gradient_checkpointing,
            use_cpu=settings.device == "cpu", shuffle_dataset=False, use_transformers_continuous_batching=False,
            use_vllm=False, logging_steps=1, eval_strategy="no", save_strategy="no", report_to="none",
            disable_tqdm=True, seed=settings.seed,
        )
        trainer = Trainer(
            model=model_dir, reward_funcs=[reward_function(settings.reward)], args=args,
            processing_class=AutoTokenizer.from_pretrained(model_dir),
            train_dataset=Dataset.from_list(read_jsonl(prompts_path)), callbacks=[StepClock()],
        )
        trainer.train()
    return grpo_measurements(steps, baseline, time.perf_counter() - start, settings, record)


def worker(framework: str, objective: str, spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    settings = Settings(**spec["settings"])
    if objective == "grpo":
        run = run_prefmodule_grpo if framework == "prefmodule" else run_trl_grpo
        result = run(settings, spec["model_dir"], spec["prompts"], spec.get("profile_dir"))
        Path(spec["result"]).write_text(json.dumps(result))
        return
    pairs = json.loads(Path(spec["pairs"]).read_text())
    if framework == "prefmodule":
        result = run_prefmodule(objective, settings, spec["model_dir"], pairs, spec.get("profile_dir"))
    else:
        result = run_trl(objective, settings, spec["model_dir"], pairs, spec.get("profile_dir"))
    Path(spec["result"]).write_text(json.dumps(result))


# ----- the whole comparison -------------------------------------------------------------------------
def benchmark(settings: Settings, profile_dir: str | None = None) -> dict:
    """Build the model and data, run every (objective, framework) in a subprocess, and summarise."""
    if settings.warmup_steps < 1:
        raise ValueError("warmup_steps must be >= 1: the first timed step starts where a previous one ended")
    frameworks = list(settings.frameworks)
    if "trl" in frameworks and util.find_spec("trl") is None:
        print("benchmark: trl is not installed, so prefmodule runs alone")
        frameworks.remove("trl")
    if "grpo" in settings.objectives:
        return benchmark_grpo(settings, frameworks, profile_dir)
    count = (settings.warmup_steps + settings.steps) * settings.batch_size
    runs = {}
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        if settings.model:
            (work / "model").symlink_to(Path(pretrained_folder(settings.model)).resolve())
            parameters = count_parameters(work / "model")
        else:
            parameters = build_model(settings, work / "model")
        if settings.data == "sharegpt":
            pairs = sharegpt_pairs(count, str(work / "model"), settings.max_length)
        else:
            pairs = synthetic_pairs(count, settings.model_config()["vocab_size"], settings.max_length, settings.seed)
        (work / "pairs.json").write_text(json.dumps(pairs))
        dtype = torch.bfloat16 if settings.dtype == "bf16" else torch.float32
        throughputs = [matmul_throughput(settings.device, dtype)]
        for repeat in range(settings.repeats):
            for objective in settings.objectives:
                for framework in frameworks:
                    if framework == "trl" and objective not in TRL_OBJECTIVES:
                        continue
                    print(f"benchmark: {framework} {objective} (repeat {repeat + 1}/{settings.repeats}) ...", flush=True)
                    result = run_in_subprocess(framework, objective, settings, work, profile_dir)
                    runs.setdefault((framework, objective), []).append(result)
                    throughputs.append(matmul_throughput(settings.device, dtype))
    runs = [fastest(framework, objective, results) for (framework, objective), results in runs.items()]
    return summarise(settings, parameters, pairs, runs, throughputs)


def benchmark_grpo(settings: Settings, frameworks: list[str], profile_dir: str | None = None) -> dict:
    """GRPO in each framework, in a subprocess: the same model, the first ``(warmup_steps + steps) * batch_size``
    prompts of ``settings.prompts`` in file order, ``batch_size`` prompts per step, G completions of each."""
    if settings.objectives != ["grpo"]:
        raise SystemExit("benchmark: grpo samples prompts rather than training on pairs; measure it on its own "
                         "(--objectives grpo)")
    if not settings.model:
        raise SystemExit("benchmark: grpo needs a pretrained model that answers its prompts: --model smollm2, "
                         "asset://tiny-llama or a folder")
    if settings.num_generations < 2:
        raise SystemExit("benchmark: --num-generations must be >= 2 (GRPO's groups)")
    from prefmodule.paths import resolve

    count = (settings.warmup_steps + settings.steps) * settings.batch_size
    rows = read_jsonl(resolve(settings.prompts))
    if len(rows) < count:
        raise SystemExit(f"benchmark: {settings.prompts} holds {len(rows)} prompts; {count} are needed "
                         f"({settings.warmup_steps} + {settings.steps} steps of {settings.batch_size})")
    rows = rows[:count]
    runs = {}
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        (work / "model").symlink_to(Path(pretrained_folder(settings.model)).resolve())
        parameters = count_parameters(work / "model")
        (work / "prompts.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        top_k = prefmodule_top_k(str(work / "model"))
        for repeat in range(settings.repeats):
            for framework in frameworks:
                print(f"benchmark: {framework} grpo (repeat {repeat + 1}/{settings.repeats}) ...", flush=True)
                result = run_in_subprocess(framework, "grpo", settings, work, profile_dir)
                runs.setdefault(framework, []).append(result)
    runs = [fastest(framework, "grpo", results) for framework, results in runs.items()]
    return summarise_grpo(settings, parameters, rows, runs, top_k)


def summarise_grpo(settings: Settings, parameters: int, rows: list[dict], runs: list[dict], top_k: int) -> dict:
    """Per run: the median step time and CPU time, the completion tokens sampled in the timed steps and the time per
    sampled token (the fairer figure: completion lengths differ run to run, as sampling does), peak memory; the
    ratios prefmodule / TRL. Every run must have completed the same prompts, step by step."""
    timed = slice(settings.warmup_steps, None)
    for run in runs:
        if run["prompt_ids"] != runs[0]["prompt_ids"]:
            raise RuntimeError(f"{run['framework']} grpo completed other prompts than {runs[0]['framework']} "
                               "(tokenised differently, or in another order)")
        tokens, times = sum(run["sampled_tokens"][timed]), sum(run["step_times_s"])
        lengths = run["completion_lengths"][timed]
        run.update(
            median_step_s=statistics.median(run["step_times_s"]),
            median_step_cpu_s=statistics.median(run["step_cpu_times_s"]),
            timed_sampled_tokens=run["sampled_tokens"][timed],
            sampled_tokens_per_s=tokens / times,
            ms_per_sampled_token=1e3 * times / tokens,
            cpu_ms_per_sampled_token=1e3 * sum(run["step_cpu_times_s"]) / tokens,
            mean_completion_length=statistics.mean(n for step in lengths for n in step),
            decode_steps=[max(step) for step in lengths],  # generate runs until the longest completion ends
            clipped_ratio=statistics.mean(n >= settings.max_completion_length for step in lengths for n in step),
            memory_above_start_mb=run["peak_memory_mb"] - run["memory_at_start_mb"],
        )
    trl = next((r for r in runs if r["framework"] == "trl"), None)
    for run in runs:
        if run["framework"] == "prefmodule" and trl is not None:
            run["time_vs_trl"] = run["median_step_s"] / trl["median_step_s"]
            run["cpu_time_vs_trl"] = run["median_step_cpu_s"] / trl["median_step_cpu_s"]
            run["time_per_token_vs_trl"] = run["ms_per_sampled_token"] / trl["ms_per_sampled_token"]
            run["cpu_time_per_token_vs_trl"] = run["cpu_ms_per_sampled_token"] / trl["cpu_ms_per_sampled_token"]
            run["memory_vs_trl"] = run["peak_memory_mb"] / trl["peak_memory_mb"]
            run["memory_above_start_vs_trl"] = run["memory_above_start_mb"] / trl["memory_above_start_mb"]
    prompt_tokens = [len(ids) for step in runs[0]["prompt_ids"] for ids in step] if runs else []
    ours = next((r for r in runs if r["framework"] == "prefmodule"), None)
    rows_targets = []
    if settings.model == "smollm2" and ours is not None:
        rows_targets = [{"objective": "grpo", "ratio": ratio_name, "target": bound, "reached": ours[ratio_name],
                         "met": ours[ratio_name] <= bound} for ratio_name, bound in GRPO_TARGETS.items()
                        if ratio_name in ours]
    return {
        "settings": asdict(settings),
        "model_config": settings.model_config(),
        "parameters": parameters,
        "data": {"prompts": len(rows), "source": settings.prompts,
                 "prompt_tokens_median": statistics.median(prompt_tokens) if prompt_tokens else None,
                 "prompt_tokens_max": max(prompt_tokens, default=None),
                 "completions_per_step": settings.batch_size * settings.num_generations},
        "sampling": {"temperature": settings.temperature, "top_p": 1.0, "top_k": top_k,
                     "max_completion_length": settings.max_completion_length},
        "machine": machine(settings.device),
        "versions": versions(),
        "runs": runs,
        "targets": rows_targets,
    }


def markdown_grpo(summary: dict, command: str) -> str:
    s, runs, data = summary["settings"], summary["runs"], summary["data"]
    lines = [
        f"Command: `{command}`",
        "",
        "| framework | median step (ms) | CPU time per step (ms) | sampled tokens per timed step | sampled tokens/s "
        "| ms per sampled token | peak memory (MB) | above start (MB) | time vs TRL | CPU time vs TRL "
        "| time per token vs TRL | memory vs TRL |",
        "|---|" + "---:|" * 11,
    ]
    for run in runs:
        lines.append(
            f"| {run['framework']}{layout(run)} | {run['median_step_s'] * 1e3:.0f} "
            f"| {run['median_step_cpu_s'] * 1e3:.0f} | {', '.join(str(t) for t in run['timed_sampled_tokens'])} "
            f"| {run['sampled_tokens_per_s']:.1f} | {run['ms_per_sampled_token']:.1f} | {run['peak_memory_mb']:.0f} "
            f"| {run['memory_above_start_mb']:.0f} | {ratio(run.get('time_vs_trl'))} "
            f"| {ratio(run.get('cpu_time_vs_trl'))} | {ratio(run.get('time_per_token_vs_trl'))} "
            f"| {ratio(run.get('memory_vs_trl'))} |"
        )
    if summary["targets"]:
        lines += ["", "| target | bound | reached | met |", "|---|---:|---:|---|"]
        lines += [f"| grpo {t['ratio']} | {t['target']} | {t['reached']:.2f} | {'yes' if t['met'] else 'no'} |"
                  for t in summary["targets"]]
    config, m, sampling = summary["model_config"], summary["machine"], summary["sampling"]
    lines += [
        "",
        f"- Model: pretrained `{s['model']}` ({config['model_type']}, {summary['parameters'] / 1e6:.2f}M parameters, "
        f"vocab {config['vocab_size']}, {config['num_hidden_layers']} layers), full fine-tuning, {s['dtype']}, "
        "no reference model (beta 0).",
        f"- Prompts: the first {data['prompts']} rows of `{data['source']}` in file order, "
        f"{s['batch_size']} per step, prompt tokens median {data['prompt_tokens_median']}, "
        f"max {data['prompt_tokens_max']} (the same ids in both, checked step by step).",
        f"- Sampling: G = {s['num_generations']} completions of each prompt ({data['completions_per_step']} per step), "
        f"at most {sampling['max_completion_length']} tokens, temperature {sampling['temperature']}, top_p 1.0, "
        f"top_k {sampling['top_k']}, stopping at EOS, KV-cached `generate` (TRL: its transformers path, no vLLM, "
        "no continuous batching).",
        "- Sampled tokens: completion tokens up to and including EOS; prefmodule's logged `train/sampled_tokens` "
        "(per step: the difference), TRL's logged `completions/mean_length` x completions (both checked against "
        "the completions' own lengths). "
        + "; ".join(f"{run['framework']}: mean completion {run['mean_completion_length']:.1f} tokens, "
                    f"{run['clipped_ratio']:.0%} cut at the limit, decode steps per timed step "
                    f"{', '.join(str(n) for n in run['decode_steps'])}" for run in runs) + ".",
        f"- Settings: reward `{s['reward']}` in both, loss_type dapo, beta 0, epsilon 0.2, one generation batch per "
        f"optimizer step (no gradient accumulation, num_iterations 1), {s['steps']} timed steps after "
        f"{s['warmup_steps']} warm-up, fastest of {s['repeats']} interleaved run(s) of each, AdamW lr {s['lr']}, "
        f"grad-norm clip {s['max_grad_norm']}, gradient checkpointing "
        f"{'on' if s['gradient_checkpointing'] else 'off'}, device {s['device']}.",
        f"- Machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads"
        + (f", GPU {m['gpu']}" if "gpu" in m else "") + f"; {m['platform']}.",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in summary["versions"].items() if v) + ".",
    ]
    return "\n".join(lines)


def count_parameters(folder: Path) -> int:
    """Parameters of a saved model (a tied head counted once), from its safetensors header."""
    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", "pt") as handle:
        return sum(math.prod(handle.get_slice(name).get_shape()) for name in handle.keys())


def fastest(framework: str, objective: str, results: list[dict]) -> dict:
    """Of the repeats of one run, the one with the lowest median step time: the least disturbed."""
    best = min(results, key=lambda result: statistics.median(result["step_times_s"]))
    medians = [statistics.median(result["step_times_s"]) for result in results]
    return {"framework": framework, "objective": objective, **best, "repeat_median_step_s": medians}


def run_in_subprocess(framework: str, objective: str, settings: Settings, work: Path, profile_dir: str | None) -> dict:
    spec = {"settings": asdict(settings), "pairs": str(work / "pairs.json"), "prompts": str(work / "prompts.jsonl"),
            "model_dir": str(work / "model"),
            "result": str(work / f"{framework}-{objective}.json"), "profile_dir": profile_dir}
    spec_path = work / f"{framework}-{objective}.spec.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, __file__, "--worker", framework, objective, "--spec", str(spec_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{framework} {objective} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(Path(spec["result"]).read_text())


def summarise(settings: Settings, parameters: int, pairs: list[dict], runs: list[dict],
              matmul_samples: list[float]) -> dict:
    config = settings.model_config()
    matmul_flops = max(matmul_samples)
    steps = batches(pairs, settings.batch_size)[settings.warmup_steps:settings.warmup_steps + settings.steps]
    expected_tokens = [sum(len(p["prompt_ids"]) * 2 + len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in batch)
                       for batch in batches(pairs, settings.batch_size)]
    for run in runs:
        if run["batch_tokens"] != expected_tokens:
            raise RuntimeError(f"{run['framework']} {run['objective']} trained on other batches than planned")
        live_reference = run["objective"] == "dpo" and settings.reference != "precomputed"
        floor = sum(step_flops(config, batch, live_reference) for batch in steps) / matmul_flops
        scored_floor = sum(step_flops(config, batch, live_reference, True) for batch in steps) / matmul_flops
        total_time = sum(run["step_times_s"])
        tokens = sum(expected_tokens[settings.warmup_steps:])
        run.update(
            median_step_s=statistics.median(run["step_times_s"]),
            median_step_cpu_s=statistics.median(run["step_cpu_times_s"]),
            tokens_per_s=tokens / total_time,
            memory_above_start_mb=run["peak_memory_mb"] - run["memory_at_start_mb"],
            floor_s=floor / len(steps),
            time_vs_floor=total_time / floor,
            time_vs_scored_floor=total_time / scored_floor,
            mfu=floor / total_time,
        )
    for run in runs:
        trl = next((r for r in runs if r["framework"] == "trl" and r["objective"] == run["objective"]), None)
        if run["framework"] == "prefmodule" and trl is not None:
            run["time_vs_trl"] = run["median_step_s"] / trl["median_step_s"]
            run["cpu_time_vs_trl"] = run["median_step_cpu_s"] / trl["median_step_cpu_s"]
            run["memory_vs_trl"] = run["peak_memory_mb"] / trl["peak_memory_mb"]
            run["memory_above_start_vs_trl"] = run["memory_above_start_mb"] / trl["memory_above_start_mb"]
    all_tokens = [len(p["prompt_ids"]) + len(p[k]) for p in pairs for k in ("chosen_ids", "rejected_ids")]
    return {
        "settings": asdict(settings),
        "model_config": config,
        "parameters": parameters,
        "data": {"pairs": len(pairs), "sequence_tokens_median": statistics.median(all_tokens),
                 "sequence_tokens_max": max(all_tokens), "non_pad_tokens_per_step": expected_tokens},
        "matmul_flops_per_s": matmul_flops,
        "matmul_flops_per_s_samples": matmul_samples,
        "machine": machine(settings.device),
        "versions": versions(),
        "runs": runs,
        "targets": targets(settings, runs),
    }


def targets(settings: Settings, runs: list[dict]) -> list[dict]:
    """The issue's targets, judged only at the shape they were set for."""
    def shape(s: Settings) -> tuple:
        return s.preset, s.model, s.data, s.model_overrides, s.device, s.dtype, s.batch_size, s.max_length

    if shape(settings) != shape(Settings()):
        return []
    rows = []
    for (objective, ratio), bound in TARGETS.items():
        run = next((r for r in runs if r["framework"] == "prefmodule" and r["objective"] == objective), None)
        if run is not None and ratio in run:
            rows.append({"objective": objective, "ratio": ratio, "target": bound, "reached": run[ratio],
                         "met": run[ratio] <= bound})
    return rows


def machine(device: str) -> dict:
    described = {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                 "platform": platform.platform()}
    if device == "cuda":
        described["gpu"] = torch.cuda.get_device_name()
    return described


def cpu_name() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return platform.processor()
    return next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")),
                platform.processor())


def versions() -> dict:
    found = {"python": platform.python_version()}
    for package in ("prefmodule", "torch", "lightning", "transformers", "trl", "accelerate", "datasets"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    found["prefmodule commit"] = git_commit()
    return found


def git_commit() -> str | None:
    """The checkout's commit, marked when the working tree has uncommitted changes."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
    except OSError:
        return None
    return commit and commit + (" + uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") else "")


# ----- report ----------------------------------------------------------------------------------
def markdown(summary: dict, command: str) -> str:
    s, runs = summary["settings"], summary["runs"]
    lines = [
        f"Command: `{command}`",
        "",
        "| objective | framework | median step (ms) | CPU time per step (ms) | tokens/s | peak memory (MB) "
        "| above start (MB) | time vs TRL | CPU time vs TRL | memory vs TRL | time vs floor | time vs scored floor |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        lines.append(
            f"| {run['objective']} | {run['framework']}{layout(run)} "
            f"| {run['median_step_s'] * 1e3:.0f} "
            f"| {run['median_step_cpu_s'] * 1e3:.0f} | {run['tokens_per_s']:.0f} | {run['peak_memory_mb']:.0f} "
            f"| {run['memory_above_start_mb']:.0f} | {ratio(run.get('time_vs_trl'))} "
            f"| {ratio(run.get('cpu_time_vs_trl'))} | {ratio(run.get('memory_vs_trl'))} "
            f"| {ratio(run['time_vs_floor'])} | {ratio(run['time_vs_scored_floor'])} |"
        )
    if summary["targets"]:
        lines += ["", "| target | bound | reached | met |", "|---|---:|---:|---|"]
        lines += [f"| {t['objective']} {t['ratio']} | {t['target']} | {t['reached']:.2f} | {'yes' if t['met'] else 'no'} |"
                  for t in summary["targets"]]
    config, data, m = summary["model_config"], summary["data"], summary["machine"]
    origin = f"pretrained `{s['model']}`" if s["model"] else "random init"
    described = (f"{data['pairs']} ShareGPT conversational pairs (chat template of the model)" if s["data"] == "sharegpt"
                 else f"{data['pairs']} synthetic pairs, log-normal lengths")
    lines += [
        "",
        f"- Model: {config['model_type']} {origin}, {summary['parameters'] / 1e6:.2f}M parameters, vocab "
        f"{config['vocab_size']}, hidden {config['hidden_size']}, {config['num_hidden_layers']} layers, heads "
        f"{config['num_attention_heads']}/{config['num_key_value_heads']} kv, intermediate {config['intermediate_size']}.",
        f"- Data: {described}, sequence tokens median "
        f"{data['sequence_tokens_median']:.0f}, max {data['sequence_tokens_max']} (max_length {s['max_length']}); "
        f"non-pad tokens per timed step: {summary['data']['non_pad_tokens_per_step'][s['warmup_steps']:]}.",
        f"- Settings: {s['batch_size']} pairs per step, {s['steps']} timed steps after {s['warmup_steps']} warm-up, "
        f"fastest of {s['repeats']} interleaved run(s) of each, "
        f"{s['dtype']}, device {s['device']}, gradient checkpointing {'on' if s['gradient_checkpointing'] else 'off'}, "
        f"AdamW lr {s['lr']}, grad-norm clip {s['max_grad_norm']}; prefmodule: logps_chunk_size "
        f"{s['logps_chunk_size'] or 'default'}, padding_free {s['padding_free']}"
        f"{', compile_layers' if s.get('compile_layers') else ''}"
        f"{', gradient_checkpointing: mlp' if s.get('checkpoint_mlp') else ''}; DPO reference {s['reference'] or 'default'}.",
        f"- Matmul throughput: {summary['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s, the best of "
        f"{', '.join(f'{x / 1e9:.0f}' for x in summary['matmul_flops_per_s_samples'])} measured before and between the runs.",
        f"- Machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads"
        + (f", GPU {m['gpu']}" if "gpu" in m else "") + f"; {m['platform']}.",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in summary["versions"].items() if v) + ".",
    ]
    return "\n".join(lines)


def ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}x"


def write_markdown(path: Path, text: str, section: str) -> None:
    """Replace the block between ``section``'s markers in ``path``, or append the block."""
    start, end = f"<!-- benchmark:{section}:start -->", f"<!-- benchmark:{section}:end -->"
    old = path.read_text() if path.exists() else ""
    if start in old and end in old:
        before, rest = old.split(start, 1)
        new = f"{before}{start}\n{text}\n{end}{rest.split(end, 1)[1]}"
    else:
        new = f"{old}{start}\n{text}\n{end}\n"
    path.write_text(new)


def parse_args(argv: list[str] | None = None) -> tuple[Settings, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small-llama")
    parser.add_argument("--model", help="a pretrained folder instead of the preset's random model; smollm2: "
                        "SmolLM2-135M-Instruct from the package index")
    parser.add_argument("--data", choices=["synthetic", "sharegpt"], default="synthetic")
    for flag, key in (("--vocab-size", "vocab_size"), ("--hidden-size", "hidden_size"),
                      ("--intermediate-size", "intermediate_size"), ("--layers", "num_hidden_layers"),
                      ("--heads", "num_attention_heads"), ("--kv-heads", "num_key_value_heads")):
        parser.add_argument(flag, dest=key, type=int, help="override the preset")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per step (grpo: prompts per step)")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--objectives", nargs="+", choices=OBJECTIVES, default=list(PAIR_OBJECTIVES),
                        help="default: the pair objectives; grpo is measured on its own (with --model)")
    parser.add_argument("--frameworks", nargs="+", choices=FRAMEWORKS, default=list(FRAMEWORKS))
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--logps-chunk-size", type=int, help="prefmodule modules' logps_chunk_size, if they take it")
    parser.add_argument("--compile-layers", action="store_true",
                        help="prefmodule modules' compile_layers (compilation falls in the warm-up steps)")
    parser.add_argument("--checkpoint-mlp", action="store_true",
                        help="prefmodule modules' gradient_checkpointing: mlp (each decoder block's MLP recomputed)")
    parser.add_argument("--padding-free", choices=["auto", "on", "off"], default="auto",
                        help="prefmodule packs each batch into one row: auto (its default), on or off")
    parser.add_argument("--reference", help="prefmodule DPOModule's reference= (copy, precomputed, ...); "
                        "'precomputed' also sets TRL's precompute_ref_log_probs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1, help="interleaved runs of each; the fastest is kept")
    parser.add_argument("--prompts", default=Settings.prompts, help="grpo: a JSONL of prompts with the reward's "
                        "columns (default: the arithmetic asset, conversational prompts with an answer)")
    parser.add_argument("--num-generations", type=int, default=Settings.num_generations, help="grpo: G")
    parser.add_argument("--max-completion-length", type=int, default=Settings.max_completion_length, help="grpo")
    parser.add_argument("--temperature", type=float, default=Settings.temperature, help="grpo: sampling temperature")
    parser.add_argument("--json", type=Path, help="write the full results here")
    parser.add_argument("--markdown", type=Path, help="write the tables into this file (see --section)")
    parser.add_argument("--section", help="name of the block --markdown replaces (default: results; grpo for "
                        "--objectives grpo)")
    parser.add_argument("--profile", help="directory for a torch profile of each run's timed steps (slows them)")
    parser.add_argument("--worker", nargs=2, metavar=("FRAMEWORK", "OBJECTIVE"), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    overrides = {key: getattr(args, key) for key in ("vocab_size", "hidden_size", "intermediate_size",
                 "num_hidden_layers", "num_attention_heads", "num_key_value_heads") if getattr(args, key) is not None}
    settings = Settings(
        preset=args.preset, model=args.model, data=args.data, model_overrides=overrides, steps=args.steps, warmup_steps=args.warmup_steps,
        batch_size=args.batch_size, max_length=args.max_length, device=args.device, dtype=args.dtype,
        gradient_checkpointing=args.gradient_checkpointing, objectives=args.objectives, frameworks=args.frameworks,
        lr=args.lr, max_grad_norm=args.max_grad_norm, logps_chunk_size=args.logps_chunk_size,
        compile_layers=args.compile_layers, checkpoint_mlp=args.checkpoint_mlp, padding_free=args.padding_free, reference=args.reference, seed=args.seed, repeats=args.repeats,
        prompts=args.prompts, num_generations=args.num_generations, max_completion_length=args.max_completion_length,
        temperature=args.temperature,
    )
    return settings, args


def main(argv: list[str] | None = None) -> dict | None:
    settings, args = parse_args(argv)
    if args.worker:
        worker(*args.worker, args.spec)
        return None
    summary = benchmark(settings, args.profile)
    command = "python scripts/benchmark.py " + " ".join(sys.argv[1:] if argv is None else argv)
    summary["command"] = command.strip()
    grpo = "grpo" in settings.objectives
    report = (markdown_grpo if grpo else markdown)(summary, summary["command"])
    print(report)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    if args.markdown:
        write_markdown(args.markdown, report, args.section or ("grpo" if grpo else "results"))
    return summary


if __name__ == "__main__":
    main()
