"""Batching: padded and packed batches, length grouping, epochs, and the per-rank shards under DDP."""

import lightning as L
import pytest
import torch
from lightning.fabric.utilities.data import _replace_dunder_methods
from lightning.pytorch.trainer.states import RunningStage
from torch.utils.data import BatchSampler

from prefmodule import ORPOModule
from prefmodule.data.collate import PreferenceCollator
from prefmodule.data.samplers import EpochSampler, PairBatchSampler

from test_data import pairs_of, setup_fit
from conftest import TINY_MODEL, write_jsonl

PAIRS = [{"index": 0, "prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6]},
         {"index": 1, "prompt_ids": [7, 8], "chosen_ids": [9], "rejected_ids": [10, 11]}]
I = -100


def test_collator_masks_prompt_and_padding():
    batch = PreferenceCollator(pad_token_id=0)(PAIRS)
    sequences = batch.sequences
    assert sequences.input_ids.tolist() == [[1, 2, 3, 4, 5], [7, 8, 9, 0, 0], [1, 2, 3, 6, 0], [7, 8, 10, 11, 0]]
    assert sequences.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0]]
    assert sequences.labels.tolist() == [[I, I, I, 4, 5], [I, I, 9, I, I], [I, I, I, 6, I], [I, I, 10, 11, I]]
    assert batch.index.tolist() == [0, 1]
    assert PreferenceCollator(0, pad_to_multiple_of=8)(PAIRS).sequences.input_ids.shape == (4, 8)


def test_packed_batch_is_one_row_with_positions_restarting_per_sequence():
    no_prompt = {"index": 7, "prompt_ids": [], "chosen_ids": [12, 13], "rejected_ids": [14]}
    batch = PreferenceCollator(pad_token_id=0, padding_free=True)([*PAIRS, no_prompt])
    # sequences: chosen of pairs 0, 1, 2, then rejected of pairs 0, 1, 2
    assert batch.sequences.input_ids.tolist() == [[1, 2, 3, 4, 5, 7, 8, 9, 12, 13, 1, 2, 3, 6, 7, 8, 10, 11, 14]]
    assert batch.sequences.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 0, 1, 2, 3, 0, 1, 2, 3, 0]]
    assert batch.sequences.sequence_ids.tolist() == [[0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5]]
    # a sequence's first token is never a target (it would be predicted from the previous sequence)
    assert batch.sequences.labels.tolist() == [[I, I, I, 4, 5, I, I, 9, I, 13, I, I, I, 6, I, I, 10, 11, I]]
    assert batch.sequences.attention_mask.tolist() == [[1] * 19]
    assert batch.index.tolist() == [0, 1, 7]


def test_packed_equals_padded_log_probs_and_gradients(tmp_path, demo_rows):
    module = ORPOModule(model=TINY_MODEL)
    module.configure_model()
    data = setup_fit(tmp_path, write_jsonl(tmp_path / "t.jsonl", demo_rows[:6]))
    pairs = pairs_of(data)
    padded = PreferenceCollator(module.tokenizer.pad_token_id)(pairs)
    packed = PreferenceCollator(module.tokenizer.pad_token_id, padding_free=True)(pairs)
    assert packed.sequences.input_ids.numel() == padded.tokens() < padded.sequences.input_ids.numel()

    def run(batch):
        module.policy.zero_grad()
        stats = module.model_stats(module.policy, batch.sequences)
        module.batch_outputs(batch)[0].loss.backward()
        return stats, [p.grad.clone() for p in module.policy.parameters()]

    (padded_stats, padded_grads), (packed_stats, packed_grads) = run(padded), run(packed)
    assert torch.equal(packed_stats.lengths, padded_stats.lengths)
    torch.testing.assert_close(packed_stats.logps, padded_stats.logps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed_stats.logits, padded_stats.logits, rtol=1e-5, atol=1e-5)
    assert padded_stats.logps.abs().min() > 1  # real log-probs, not zeros
    for packed_grad, padded_grad in zip(packed_grads, padded_grads):
        torch.testing.assert_close(packed_grad, padded_grad, rtol=1e-4, atol=1e-6)
    assert sum(g.abs().sum() for g in padded_grads) > 0


def shards(pairs, batch_size, ranks=2, epoch=0, **kwargs):
    """Every rank's batches for ``epoch``, built as each rank of a DDP run would."""
    out = []
    for rank in range(ranks):
        sampler = PairBatchSampler(EpochSampler(range(pairs)), batch_size, num_replicas=ranks, rank=rank, **kwargs)
        sampler.set_epoch(epoch)
        out.append(list(sampler))
        assert len(out[-1]) == len(sampler)
    return out


@pytest.mark.parametrize("pairs", [2, 7, 16, 17, 33])
@pytest.mark.parametrize("batch_size", [1, 4])
@pytest.mark.parametrize("group_by_length, shuffle", [(False, False), (False, True), (True, True), (True, False)])
def test_two_ranks_cover_every_pair_once_with_equal_batch_counts(pairs, batch_size, group_by_length, shuffle):
    lengths = [(7 * i) % 23 for i in range(pairs)] if group_by_length else None
    rank0, rank1 = shards(pairs, batch_size, lengths=lengths, shuffle=shuffle, seed=5)
    assert len(rank0) == len(rank1) >= 1  # DDP steps in lockstep
    seen = [i for batch in rank0 + rank1 for i in batch]
    assert sorted(seen) == list(range(pairs))  # each pair exactly once: no padding repeats, nothing lost
    assert all(1 <= len(batch) <= batch_size + 1 for batch in rank0 + rank1)


def test_epochs_reshuffle_reproducibly_and_grouping_cuts_padding(demo_rows, tmp_path):
    lengths = [len(r["prompt"]) + max(len(r["chosen"]), len(r["rejected"])) for r in demo_rows]
    epoch0 = shards(len(lengths), 8, lengths=lengths, shuffle=True, seed=1)
    assert shards(len(lengths), 8, lengths=lengths, shuffle=True, seed=1) == epoch0
    assert shards(len(lengths), 8, epoch=1, lengths=lengths, shuffle=True, seed=1) != epoch0
    assert shards(len(lengths), 8, lengths=lengths, shuffle=True, seed=2) != epoch0

    def padding(batches):
        return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches)

    grouped = padding([b for rank in epoch0 for b in rank])
    plain = padding([b for rank in shards(len(lengths), 8, shuffle=True, seed=1) for b in rank])
    assert grouped < plain / 4


@pytest.mark.parametrize("mode", [RunningStage.TRAINING, RunningStage.PREDICTING])
def test_lightning_ddp_sampler_injection_keeps_our_shards(tmp_path, demo_rows, mode):
    """Lightning re-creates a batch sampler made in a ``*_dataloader`` hook around another sampler (its own
    ``DistributedSampler`` under DDP, the DataLoader's when predicting): shards, lengths, seed and epoch survive."""
    data = setup_fit(tmp_path, write_jsonl(tmp_path / "t.jsonl", demo_rows[:50]), group_by_length=True,
                     batch_size=4, seed=3)
    data.trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)  # not launched: rank 0 of 2
    with _replace_dunder_methods(BatchSampler, "__pl_saved_args"):  # what Lightning does around the hook
        loader = data.train_dataloader()
    prepared = data.trainer._data_connector._prepare_dataloader(loader, shuffle=True, mode=mode)
    sampler = getattr(prepared.batch_sampler, "_batch_sampler", prepared.batch_sampler)  # predict wraps it
    assert isinstance(sampler, PairBatchSampler) and (sampler.num_replicas, sampler.rank) == (2, 0)
    assert sampler.sampler is not loader.batch_sampler.sampler  # Lightning did replace it
    sampler.set_epoch(1)
    assert list(prepared.batch_sampler) == shards(50, 4, epoch=1, lengths=data.datasets["train"].lengths(),
                                                  shuffle=True, seed=3)[0]


def test_fit_with_grouping_and_packing_sees_every_pair_once_per_epoch(tmp_path, demo_rows):
    data = setup_fit(tmp_path, write_jsonl(tmp_path / "t.jsonl", demo_rows[:24]), batch_size=8,
                     group_by_length=True, padding_free=True)
    data.tokenizer = None  # borrowed from the module, as in a CLI run
    seen = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            assert batch.sequences.input_ids.shape[0] == 1 and batch.sequences.packed
            seen.append((trainer.current_epoch, batch.index.tolist()))

    trainer = L.Trainer(default_root_dir=tmp_path, max_epochs=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Record()])
    module = ORPOModule(model=TINY_MODEL)
    trainer.fit(module, datamodule=module.connect(data))
    orders = [[i for epoch, batch in seen if epoch == e for i in batch] for e in (0, 1)]
    assert sorted(orders[0]) == sorted(orders[1]) == list(range(24))
    assert orders[0] != orders[1]  # Lightning's set_epoch reached the sampler
