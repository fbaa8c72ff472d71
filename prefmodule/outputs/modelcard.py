"""The model card of an exported model (``hf_model/README.md``): Hub metadata, objective and paper, data, settings."""

from __future__ import annotations

import os

from huggingface_hub import ModelCard, ModelCardData
from lightning.pytorch import LightningModule, Trainer

from prefmodule.data import PreferenceDataModule
from prefmodule.data.mixture import SourceGroup
from prefmodule.outputs.hub import hub_id

# the model's task -> (transformers' auto class, the Hub's pipeline tag)
TASKS = {"causal_lm": ("AutoModelForCausalLM", "text-generation"),
         "reward": ("AutoModelForSequenceClassification", "text-classification")}


def batch_layout(module: LightningModule, trainer: Trainer) -> str:
    """How the run's batches were laid out: ``packed``, or ``padded`` with the reason when the module's models
    could not take packed rows."""
    packs = getattr(trainer.datamodule, "packs", None)
    if callable(packs) and packs():
        return "packed"
    packing = module.packed_rows() if callable(getattr(module, "packed_rows", None)) else None
    reason = None if packing is None or packing else packing.reason
    return f"padded ({reason})" if reason else "padded"


def write_model_card(folder: str, module: LightningModule, trainer: Trainer, repo_id: str | None = None) -> str:
    """Write ``<folder>/README.md``: Hub metadata, the objective and its paper, data, hyperparameters, final
    metrics and how to load the model (from ``repo_id`` when it is uploaded there). Returns its path."""
    hparams = dict(module.hparams)
    family, (objective, paper, arxiv) = _objective(module)
    data = dict(getattr(trainer.datamodule, "hparams", {}) or {})
    sources = data_sources(trainer.datamodule)
    datasets = sorted({found for groups in sources.values() for group in groups for name in group.names
                       if (found := hub_id(name))})
    tags = ["prefmodule", family.lower().replace(" ", "-")]
    if isinstance(hparams.get("loss_type"), str) and hparams["loss_type"] != "sigmoid":
        tags.append(hparams["loss_type"])
    if hparams.get("lora"):
        tags.append("lora")
    task = module.model_settings.task
    auto_class, pipeline = TASKS[task]
    card_data = ModelCardData(base_model=hub_id(module.model_name), library_name="transformers", tags=tags,
                              datasets=datasets or None, pipeline_tag=pipeline)
    settings = {
        **{name: value for name, value in hparams.items() if name not in ("model", "tokenizer") and name[0] != "_"},
        **{f"data.{name}": value for name, value in data.items()
           if name not in ("train", "val", "test", "predict") and name[0] != "_" and value is not None},
        "precision": trainer.precision, "accumulate_grad_batches": trainer.accumulate_grad_batches,
        "processes": trainer.world_size, "optimizer steps": trainer.global_step,
        "batches": batch_layout(module, trainer),
    }
    metrics = {name: value.item() for name, value in sorted(trainer.callback_metrics.items())
               if name.startswith("val/") and value.numel() == 1}
    where = repo_id or os.path.abspath(folder)
    title = repo_id or f"{os.path.basename(module.model_name.rstrip('/'))}, {objective}"
    body = "\n".join([
        f"# {title}",
        "",
        f"`{module.model_name}` {'trained on' if task == 'reward' else 'aligned on'} {module.trained_on} with "
        f"**{objective}**"
        + (f" ({paper}, [arXiv {arxiv}](https://arxiv.org/abs/{arxiv}))" if arxiv else "")
        + f", trained with prefmodule's `{type(module).__name__}`.",
        "",
        "## Data",
        "",
        *([f"- {split}: {describe_groups(groups)}" for split, groups in sources.items()] or ["- (not recorded)"]),
        "",
        "## Hyperparameters",
        "",
        "| name | value |",
        "|---|---|",
        *[f"| {name} | `{value}` |" for name, value in settings.items()],
        "",
        "## Final metrics",
        "",
        *(["| metric | value |", "|---|---|", *[f"| {name} | {value:.4f} |" for name, value in metrics.items()]]
          if metrics else ["(no validation metrics)"]),
        "",
        "## How to load it",
        "",
        "```python",
        f"from transformers import {auto_class}, AutoTokenizer",
        "",
        f'model = {auto_class}.from_pretrained("{where}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{where}")',
        "```",
        "",
    ])
    path = os.path.join(folder, "README.md")
    ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}").save(path)
    return path


def _objective(module: LightningModule) -> tuple[str, tuple[str, str, str]]:
    """The module's family (its class's ``citation``: DPO, ORPO, SimPO, KTO, CPO, ...) and the objective it trains:
    (name, paper, arXiv id), its loss type's own where it has one (``cited``)."""
    citation = module.cited() if callable(getattr(module, "cited", None)) else None
    if citation is None:
        name = type(module).__name__
        return name, (name, "", "")
    return type(module).citation[0], citation


def data_sources(datamodule) -> dict[str, list[SourceGroup]]:
    """The source groups of the training and evaluation splits of a :class:`PreferenceDataModule` (a mixture is
    several, each with its weight); nothing for another datamodule."""
    groups = getattr(datamodule, "groups", None) if isinstance(datamodule, PreferenceDataModule) else None
    return {split: groups[split] for split in ("train", "val", "test") if groups and groups.get(split)}


def describe_groups(groups: list[SourceGroup]) -> str:
    """``a.jsonl`` / ``a.jsonl`` (weight 0.7), ``b.jsonl`` (weight 0.3): each source of a split, Markdown."""
    return ", ".join(", ".join(f"`{name}`" for name in group.names)
                     + (f" (weight {group.weight:g})" if group.weight is not None else "") for group in groups)
