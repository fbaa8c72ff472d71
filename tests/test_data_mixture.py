"""Weighted mixtures of sources, each with its own format and columns, drawn by weight every epoch."""

import logging
from collections import Counter

import numpy as np
import pytest
import yaml

from prefmodule.data import PreferenceDataModule
from prefmodule.data.mixture import Mixture
from prefmodule.errors import ConfigError

from conftest import TINY_MODEL, write_jsonl
from test_data import GOOD_CHAT, pairs_of, setup_fit, summary
from test_data_sources import write_parquet


def epoch_groups(data, epoch, split="train"):
    """Per source group, how many items the epoch's batches draw, and the batches."""
    loader = data.train_dataloader()
    loader.batch_sampler.set_epoch(epoch)
    batches = list(loader.batch_sampler)
    dataset = loader.dataset
    owner = np.searchsorted(dataset.starts, dataset.positions, side="right") - 1
    return Counter(int(owner[i]) for b in batches for i in b), batches


def test_weighted_sources_with_their_own_formats(tmp_path, caplog, demo_rows):
    standard = write_jsonl(tmp_path / "a.jsonl", demo_rows[:30])
    renamed = write_parquet(tmp_path / "b.parquet", [{"q": r["prompt"], "good": r["chosen"], "bad": r["rejected"]}
                                                     for r in demo_rows[30:40]])
    chat = write_jsonl(tmp_path / "c.jsonl", [GOOD_CHAT] * 4)
    train = [{"path": standard, "weight": 0.5},
             {"path": renamed, "weight": 0.3, "columns": {"q": "prompt", "good": "chosen", "bad": "rejected"}},
             {"path": chat, "weight": 0.2, "format": "conversational"}]
    with caplog.at_level(logging.INFO):
        data = setup_fit(tmp_path, train, batch_size=4)
        counts, batches = epoch_groups(data, 0)
    lines = summary(caplog).splitlines()
    assert any(f"train <- {standard} (standard format, weight 0.5): 30 rows read, 30 pairs kept" in l for l in lines)
    assert any(f"train <- {renamed} (standard format, weight 0.3): 10 rows read, 10 pairs kept" in l for l in lines)
    assert any(f"train <- {chat} (conversational format, weight 0.2): 4 rows read, 4 pairs kept" in l for l in lines)
    assert (f"train mixture, items per epoch: {standard} 22 of 30 (weight 0.5); {renamed} 13 of 10 (weight 0.3, 1.3 "
            f"passes); {chat} 9 of 4 (weight 0.2, 2.2 passes)") in summary(caplog)
    assert counts == {0: 22, 1: 13, 2: 9} and sum(map(len, batches)) == 44
    indices = [p["index"] for p in pairs_of(data)]
    assert indices == list(range(44))  # row numbers run across the sources
    again, _ = epoch_groups(data, 0)
    later, later_batches = epoch_groups(data, 1)
    assert again == counts and later == counts and later_batches != batches  # same shares, new draw each epoch
    assert _ == batches  # reproducible


def test_mixture_draws_whole_passes_then_a_random_part():
    mixture = Mixture([10, 3], [1.0, 3.0])
    assert mixture.quotas() == [3, 10]
    drawn = mixture.draw(seed=0, epoch=0)
    small = Counter(int(i) for i in drawn if i >= 10)
    assert sorted(small.values()) == [3, 3, 4] and len({int(i) for i in drawn if i < 10}) == 3
    assert mixture.draw(seed=0, epoch=0).tolist() == drawn.tolist() != mixture.draw(seed=0, epoch=1).tolist()


def test_hub_folder_in_a_mixture_and_kl_chunks_per_source(tmp_path, demo_rows):
    folder = tmp_path / "hub-copy" / "data"
    folder.mkdir(parents=True)
    write_parquet(folder / "train-00000-of-00001.parquet", demo_rows[:8])
    rows = [{"prompt": r["prompt"], "completion": r["chosen"], "label": True} for r in demo_rows[8:20]]
    train = [{"path": str(tmp_path / "hub-copy"), "weight": 1}, {"path": write_jsonl(tmp_path / "kto.jsonl", rows),
                                                                 "weight": 1}]
    data = setup_fit(tmp_path, train, batch_size=4, unpaired=True, kl_completions=True)
    dataset = data.datasets["train"]
    assert len(dataset) == 28 and dataset.chunks_per_group == [4, 3]
    counts, batches = epoch_groups(data, 0)
    assert sum(counts.values()) == 28 and len(batches) == 7
    owner = np.searchsorted(dataset.starts, dataset.positions, side="right") - 1
    assert all(len({int(owner[i]) for i in b}) == 1 for b in batches)  # a batch (a KL chunk) stays in one source


@pytest.mark.parametrize("train, message", [
    ([{"path": "a.jsonl", "weight": 1}, {"path": "b.jsonl"}], "give every source a weight, or none"),
    ([{"path": "a.jsonl", "weight": 0}], r"data.train\[0\].weight: expected a number > 0, got 0"),
    ([{"path": "a.jsonl", "wieght": 1}], r"a source takes the keys \['path', 'weight'"),
    ([{"weight": 1}], "needs `path`"),
    ([{"path": "a.jsonl", "format": "sharegpt4"}], "data.train.format must be one of"),
])
def test_bad_mixtures_fail_at_construction(tmp_path, demo_rows, train, message):
    write_jsonl(tmp_path / "a.jsonl", demo_rows[:2])
    write_jsonl(tmp_path / "b.jsonl", demo_rows[:2])
    train = [{**t, "path": str(tmp_path / t["path"])} if "path" in t else t for t in train]
    with pytest.raises(ConfigError, match=message):
        PreferenceDataModule(train=train, tokenizer=TINY_MODEL)
    with pytest.raises(ConfigError, match="weights draw training epochs"):
        PreferenceDataModule(val=[{"path": str(tmp_path / "a.jsonl"), "weight": 1}])


def test_the_cli_takes_a_mixture_from_yaml(tmp_path, demo_rows, capsys):
    from prefmodule.cli import main

    a, b = write_jsonl(tmp_path / "a.jsonl", demo_rows[:4]), write_jsonl(tmp_path / "b.jsonl", demo_rows[4:8])
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"data": {"train": [{"path": a, "weight": 0.7},
                                                         {"path": b, "weight": 0.3, "format": "standard"}]}}))
    with pytest.raises(SystemExit) as exit:
        main(["fit", "--model=prefmodule.ORPOModule", f"--model.model={TINY_MODEL}", f"--config={config}",
              "--print_config"])
    assert exit.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["train"] == [{"path": a, "weight": 0.7}, {"path": b, "weight": 0.3, "format": "standard"}]
