"""Unpaired rows for KTO: formats, labels, TRL's KTOTrainer token ids and KL completions, chunked batches."""

import logging
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch

from prefmodule.data import BatchFormat, PreferenceDataModule
from prefmodule.data.collate import PreferenceCollator
from prefmodule.data.formats import DataValidationError
from prefmodule.data.samplers import ChunkBatchSampler, EpochSampler
from prefmodule.errors import DataError
from prefmodule.models.loading import load_tokenizer

from conftest import TINY_MODEL, write_jsonl
from test_data import GOOD, summary

USER = [{"role": "user", "content": "Hi?"}]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TINY_MODEL)


def unpaired_rows(demo_rows, count):
    """Rows alternating desirable / undesirable answers, as a thumbs-up/down dump would."""
    return [{"prompt": r["prompt"], "completion": r["chosen"] if i % 3 else r["rejected"], "label": bool(i % 3)}
            for i, r in enumerate(demo_rows[:count])]


def setup_unpaired(tmp_path, train, stage="fit", **kwargs):
    kwargs = {"tokenizer": TINY_MODEL, "cache_dir": str(tmp_path / "cache"), "unpaired": True,
              "kl_completions": True, **kwargs}
    data = PreferenceDataModule(train=train, **kwargs) if stage == "fit" else PreferenceDataModule(**kwargs)
    data.setup(stage)
    return data


def items(dataset):
    return [dataset[i] for i in range(len(dataset))]


def trl_kto_prepare(tokenizer, rows, max_length=None, batch_size=8):
    """TRL's own KTOTrainer tokenisation (unpairing, EOS, KL completions rotated within batches)."""
    kto = pytest.importorskip("trl.trainer.kto_trainer")
    from datasets import Dataset

    args = SimpleNamespace(dataset_num_proc=None, max_length=max_length, per_device_train_batch_size=batch_size)
    stand_in = SimpleNamespace(_tokenizer=tokenizer, calculate_KL=True, desirable_weight=1.0, undesirable_weight=1.0)
    return list(kto.KTOTrainer._prepare_dataset(stand_in, Dataset.from_list(rows), tokenizer, args, "eval"))


def assert_same_as_trl(ours, trl):
    assert len(ours) == len(trl)
    for mine, theirs in zip(ours, trl):
        assert mine["prompt_ids"] == theirs["prompt_ids"]
        assert mine["completion_ids"] == theirs["completion_ids"]
        assert mine["kl_completion_ids"] == theirs["KL_completion_ids"]
        assert mine["label"] is bool(theirs["label"])


# ----- TRL parity ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", ["unpaired text", "unpaired messages", "pairs"])
def test_eval_items_equal_trl_kto_ids_and_kl_completions(tmp_path, tokenizer, demo_rows, shape):
    """An evaluation split is chunked in file order by ``eval_batch_size``: TRL's ``add_kl_completion_ids`` over
    batches of ``per_device_train_batch_size`` (equal here), on TRL's own tokenisation."""
    if shape == "unpaired text":
        rows = unpaired_rows(demo_rows, 11)
    elif shape == "unpaired messages":
        rows = [{"prompt": [{"role": "user", "content": r["prompt"]}],
                 "completion": [{"role": "assistant", "content": r["completion"]}], "label": r["label"]}
                for r in unpaired_rows(demo_rows, 11)]
    else:
        rows = demo_rows[:6]  # 12 unpaired rows: the chosen ones, then the rejected ones
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    data = setup_unpaired(tmp_path, None, stage="validate", val=path, batch_size=4)
    ours = items(data.datasets["val"])
    assert_same_as_trl(ours, trl_kto_prepare(tokenizer, rows, batch_size=4))
    if shape == "pairs":  # index: the row for its chosen response, rows read + row for its rejected one
        assert [o["index"] for o in ours] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
        assert [o["label"] for o in ours] == [True] * 6 + [False] * 6
    else:
        assert [o["index"] for o in ours] == list(range(11))
        assert data.datasets["val"].chunk_sizes == [4, 4, 3]


def test_pairs_unpair_in_trls_blocks_of_a_thousand(tmp_path, tokenizer):
    """TRL's ``unpair_preference_dataset`` maps batches of 1,000 pairs: chosen rows of a block, then its rejected rows."""
    rows = [{"prompt": f"Q{i}?", "chosen": f"yes {i}", "rejected": f"no {i}"} for i in range(1003)]
    data = setup_unpaired(tmp_path, None, stage="validate", val=write_jsonl(tmp_path / "many.jsonl", rows),
                          kl_completions=False)
    ours = items(data.datasets["val"])
    block = list(range(1000))
    assert [o["index"] for o in ours] == block + [1003 + i for i in block] + [1000, 1001, 1002, 2003, 2004, 2005]
    theirs = trl_kto_prepare(tokenizer, rows)
    assert [o["completion_ids"] for o in ours] == [t["completion_ids"] for t in theirs]
    assert [o["label"] for o in ours] == [t["label"] for t in theirs]
    assert "kl_completion_ids" not in ours[0]


def test_max_length_cuts_completions_and_kl_completions_as_trls_collator(tmp_path, tokenizer, demo_rows):
    kto = pytest.importorskip("trl.trainer.kto_trainer")
    rows = unpaired_rows(demo_rows, 8)
    rows[3]["prompt"] = " ".join(["word"] * 15)  # a long prompt (31 ids): its KL completion (row 2's) is cut harder
    rows[5]["prompt"] = " ".join(["word"] * 60)  # fills max_length: dropped, as TRL drops it
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    data = setup_unpaired(tmp_path, None, stage="validate", val=path, batch_size=7, max_length=40)
    ours = items(data.datasets["val"])
    theirs = trl_kto_prepare(tokenizer, rows, max_length=40, batch_size=7)
    assert [o["index"] for o in ours] == [0, 1, 2, 3, 4, 6, 7]
    batch = PreferenceCollator(tokenizer.pad_token_id)(ours)
    trl_batch = kto.DataCollatorForUnpairedPreference(pad_token_id=tokenizer.pad_token_id, max_length=40)(theirs)
    n = len(ours)
    for i in range(n):
        for mine, prefix in ((i, ""), (n + i, "KL_")):
            width = int(trl_batch[f"{prefix}attention_mask"][i].sum())
            assert batch.sequences.attention_mask[mine].sum() == width <= 40
            assert torch.equal(batch.sequences.input_ids[mine, :width], trl_batch[f"{prefix}input_ids"][i, :width])
            targets = batch.sequences.labels[mine, :width] != -100
            assert torch.equal(targets.long(), trl_batch[f"{prefix}completion_mask"][i, :width])
    assert batch.sequences.attention_mask[n + 3].sum() == 40 and len(ours[2]["completion_ids"]) > 40 - 31


# ----- batches -------------------------------------------------------------------------------------------------
def test_collated_unpaired_batch_layout(tokenizer):
    rows = [{"index": 4, "prompt_ids": [1, 2], "completion_ids": [3, 4], "kl_completion_ids": [5], "label": True},
            {"index": 9, "prompt_ids": [6], "completion_ids": [5], "kl_completion_ids": [3, 4], "label": False}]
    padded = PreferenceCollator(pad_token_id=0)(rows)
    assert padded.sequences.input_ids.tolist() == [[1, 2, 3, 4], [6, 5, 0, 0], [1, 2, 5, 0], [6, 3, 4, 0]]
    assert padded.sequences.labels.tolist() == [[-100, -100, 3, 4], [-100, 5, -100, -100], [-100, -100, 5, -100],
                                                [-100, 3, 4, -100]]
    assert padded.label.tolist() == [True, False] and padded.label.dtype == torch.bool
    assert padded.index.tolist() == [4, 9]
    packed = PreferenceCollator(pad_token_id=0, padding_free=True)(rows)
    assert packed.sequences.sequence_ids.tolist() == [[0, 0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 3]]
    assert packed.sequences.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 0, 1, 2, 0, 1, 2]]
    without_kl = PreferenceCollator(pad_token_id=0)([{k: v for k, v in r.items() if k != "kl_completion_ids"}
                                                     for r in rows])
    assert without_kl.sequences.input_ids.shape == (2, 4)


def test_training_batches_are_the_kl_chunks_mixed_and_reshuffled(tmp_path, demo_rows):
    """A file sorted by label still gives mixed batches; each batch's KL completions are its own completions,
    rotated by one; every row once per epoch; the chunk order changes with the epoch, the chunks do not."""
    rows = sorted(unpaired_rows(demo_rows, 30), key=lambda r: r["label"])
    data = setup_unpaired(tmp_path, write_jsonl(tmp_path / "sorted.jsonl", rows), batch_size=4)
    loader = data.train_dataloader()
    dataset = loader.dataset
    epochs = []
    for epoch in (0, 1):
        loader.batch_sampler.set_epoch(epoch)
        batches = list(loader.batch_sampler)
        assert [len(b) for b in batches if len(b) != 4] == [2]  # 30 rows: 7 chunks of 4 and one of 2
        assert sorted(i for b in batches for i in b) == list(range(30))
        for batch in batches:
            rows_of = [dataset[i] for i in batch]
            assert [r["kl_completion_ids"] for r in rows_of] == [r["completion_ids"] for r in rows_of[-1:] + rows_of[:-1]]
        epochs.append(batches)
    assert sorted(map(tuple, epochs[0])) == sorted(map(tuple, epochs[1])) and epochs[0] != epochs[1]
    labels = [[dataset[i]["label"] for i in b] for b in epochs[0]]
    assert sum(len(set(b)) == 2 for b in labels) >= 4  # labels mixed within batches, though the file is sorted
    batch = next(iter(loader))
    assert batch.sequences.input_ids.shape[0] == 2 * batch.index.numel()
    assert batch.label.dtype == torch.bool


@pytest.mark.parametrize("chunks, ranks", [([4, 4, 4, 4, 4, 2], 2), ([4, 4, 4, 4, 3], 2), ([3, 3, 3, 1], 3)])
def test_ddp_ranks_take_whole_chunks(chunks, ranks):
    total = sum(chunks)
    bounds = np.cumsum([0] + chunks)
    per_rank = []
    for rank in range(ranks):
        sampler = ChunkBatchSampler(EpochSampler(range(total)), chunks, shuffle=True, seed=3, num_replicas=ranks,
                                    rank=rank)
        sampler.set_epoch(2)
        per_rank.append(list(sampler))
        assert len(per_rank[-1]) == len(sampler) == len(chunks) // ranks
    assert sorted(i for batches in per_rank for b in batches for i in b) == list(range(total))
    whole = {tuple(range(bounds[c], bounds[c + 1])) for c in range(len(chunks))}
    for batches in per_rank:
        for batch in batches:  # one chunk, or (the last batch of low ranks) two whole chunks
            first = next(c for c in whole if c[0] == batch[0])
            assert tuple(batch[:len(first)]) == first and (len(batch) == len(first) or tuple(batch[len(first):]) in whole)


# ----- formats and labels --------------------------------------------------------------------------------------
def test_llama_factory_kto_files_and_label_spellings(tmp_path, tokenizer):
    """LLaMA-Factory's KTO file: ``messages`` (role/content or ShareGPT's from/value) and ``kto_tag``."""
    conversation = [*USER, {"role": "assistant", "content": "Hello!"}]
    rows = [{"messages": conversation, "kto_tag": True},
            {"messages": [*USER, {"role": "assistant", "content": "Go away."}], "kto_tag": 0},
            {"messages": conversation, "kto_tag": "false"}]
    path = write_jsonl(tmp_path / "kto.jsonl", rows)
    data = setup_unpaired(tmp_path, path, columns={"kto_tag": "label"}, kl_completions=False)
    ours = items(data.datasets["train"])
    assert [o["label"] for o in sorted(ours, key=lambda o: o["index"])] == [True, False, False]
    reference = setup_unpaired(tmp_path, write_jsonl(tmp_path / "explicit.jsonl", [
        {"prompt": USER, "completion": [m], "label": True} for m in (conversation[1],)]), kl_completions=False)
    first = next(o for o in ours if o["index"] == 0)
    assert {k: first[k] for k in ("prompt_ids", "completion_ids")} == {
        k: items(reference.datasets["train"])[0][k] for k in ("prompt_ids", "completion_ids")}
    sharegpt = [{"messages": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello!"}], "label": 1}]
    turns = setup_unpaired(tmp_path, write_jsonl(tmp_path / "turns.jsonl", sharegpt), kl_completions=False)
    assert items(turns.datasets["train"])[0]["completion_ids"] == first["completion_ids"]


def test_bad_labels_and_rows_are_named(tmp_path, caplog):
    rows = [{"prompt": "Hi?", "completion": "Hello.", "label": True},
            {"prompt": "Hi?", "completion": "Hello.", "label": "yes"},
            {"prompt": "Hi?", "completion": "Hello.", "label": 1.0},
            {"prompt": "Hi?", "completion": "Hello."},
            {"prompt": "Hi?", "completion": " ", "label": False},
            {"messages": [*USER], "label": True}]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    message = str(pytest.raises(DataValidationError, setup_unpaired, tmp_path, path).value)
    assert f"{path}:2: field 'label': expected true/false (or 1/0), got 'yes'" in message
    assert f"{path}:3: field 'label': expected true/false (or 1/0), got 1.0" in message
    assert f"{path}:4: field 'label': missing" in message
    assert f"{path}:5: field 'completion': empty response" in message
    assert f"{path}:6: field 'prompt': missing" in message
    implicit = write_jsonl(tmp_path / "implicit.jsonl", [{"messages": [*USER, {"role": "assistant", "content": "a"}],
                                                          "label": True}, {"messages": USER, "label": False}])
    message = str(pytest.raises(DataValidationError, setup_unpaired, tmp_path, implicit).value)
    assert (f"{implicit}:2: field 'messages': the last message is the completion and should be the assistant's, "
            "got user") in message
    with caplog.at_level(logging.INFO):
        setup_unpaired(tmp_path, path, on_bad_rows="skip", kl_completions=False)
    assert ("(unpaired format): 6 rows read, 1 unpaired rows kept (1 desirable, 0 undesirable), 5 dropped"
            in summary(caplog))


def test_a_paired_objective_refuses_unpaired_data(tmp_path, capsys):
    path = write_jsonl(tmp_path / "kto.jsonl", [{"prompt": "Hi?", "completion": "Hello.", "label": True}])
    with pytest.raises(DataError, match="unpaired data, and a paired objective trains on pairs .*KTOModule"):
        PreferenceDataModule(train=path, tokenizer=TINY_MODEL, cache_dir=str(tmp_path / "c")).setup("fit")
    from prefmodule.cli import main

    with pytest.raises(SystemExit) as exit:
        main(["fit", "--model=prefmodule.ORPOModule", f"--model.model={TINY_MODEL}", f"--data.train={path}",
              f"--data.cache_dir={tmp_path / 'cache'}", f"--trainer.default_root_dir={tmp_path}",
              "--trainer.max_steps=1"])
    assert exit.value.code == 2
    assert "and ORPOModule trains on pairs (prompt, chosen, rejected)" in capsys.readouterr().err


def test_shape_follows_the_connected_objective_and_predict_keeps_pairs(tmp_path, demo_rows):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", demo_rows[:3])
    rows = write_jsonl(tmp_path / "rows.jsonl", unpaired_rows(demo_rows, 3))
    data = PreferenceDataModule(train=pairs, val=rows, predict=pairs, cache_dir=str(tmp_path / "cache"), batch_size=2)
    data.trainer = L.Trainer(logger=False)
    data.connect(BatchFormat(load_tokenizer(TINY_MODEL), unpaired=True, kl_completions=True))  # what KTO says
    assert data.unpaired() and data.kl_completions()
    data.setup("fit")
    assert len(data.datasets["train"]) == 6 and "kl_completion_ids" in data.datasets["train"][0]
    data.setup("predict")  # "which answer does the model prefer": pairs stay pairs
    assert set(data.datasets["predict"][0]) == {"index", "prompt_ids", "chosen_ids", "rejected_ids"}
    data.hparams.predict = rows
    data.groups["predict"] = data.groups["val"]
    data.setup("predict")
    assert "label" in data.datasets["predict"][0]


def test_held_out_rows_keep_both_answers_of_a_pair_together(tmp_path, demo_rows):
    data = setup_unpaired(tmp_path, write_jsonl(tmp_path / "pairs.jsonl", demo_rows[:20]), val_fraction=0.25,
                          batch_size=4)
    train, val = (items(data.datasets[s]) for s in ("train", "val"))
    assert len(val) == 10 and len(train) == 30
    held = {o["index"] % 20 for o in val}
    assert len(held) == 5 and not held & {o["index"] % 20 for o in train}
    assert all("kl_completion_ids" in o for o in val)


def test_labels_weigh_by_source_rows_without_reading_tokens(tmp_path, demo_rows):
    data = setup_unpaired(tmp_path, write_jsonl(tmp_path / "rows.jsonl", unpaired_rows(demo_rows, 9)),
                          kl_completions=False)
    assert data.datasets["train"].labels().tolist() == [bool(i % 3) for i in range(9)]


def test_pairs_files_keep_their_format_name_in_the_summary(tmp_path, caplog, demo_rows):
    with caplog.at_level(logging.INFO):
        setup_unpaired(tmp_path, write_jsonl(tmp_path / "pairs.jsonl", demo_rows[:4] + [GOOD]), kl_completions=False)
    assert ("(standard format, each pair as two unpaired rows): 5 rows read, 10 unpaired rows kept (5 desirable, "
            "5 undesirable)") in summary(caplog)


def test_lightning_ddp_injection_keeps_whole_chunks(tmp_path, demo_rows):
    """Lightning re-creates a batch sampler made in a ``*_dataloader`` hook around its own sampler under DDP:
    the chunks, the seed and the rank survive, and rank 0 gets its own whole chunks."""
    from lightning.fabric.utilities.data import _replace_dunder_methods
    from lightning.pytorch.trainer.states import RunningStage
    from torch.utils.data import BatchSampler

    data = setup_unpaired(tmp_path, write_jsonl(tmp_path / "rows.jsonl", unpaired_rows(demo_rows, 26)), batch_size=4)
    data.trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)  # not launched: rank 0 of 2
    with _replace_dunder_methods(BatchSampler, "__pl_saved_args"):
        loader = data.train_dataloader()
    prepared = data.trainer._data_connector._prepare_dataloader(loader, shuffle=True, mode=RunningStage.TRAINING)
    sampler = prepared.batch_sampler
    assert isinstance(sampler, ChunkBatchSampler) and (sampler.num_replicas, sampler.rank) == (2, 0)
    sampler.set_epoch(1)
    expected = ChunkBatchSampler(EpochSampler(range(26)), [4] * 6 + [2], shuffle=True, seed=42, num_replicas=2, rank=0)
    expected.set_epoch(1)
    assert list(sampler) == list(expected) and len(sampler) == 3
