"""scripts/benchmark.py on a micro shape: real runs of both frameworks, real numbers in the JSON."""

import importlib.util
import json
import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "scripts"))
import benchmark  # noqa: E402

HAS_TRL = importlib.util.find_spec("trl") is not None
MICRO = ["--vocab-size", "256", "--hidden-size", "32", "--intermediate-size", "64", "--layers", "1",
         "--heads", "2", "--kv-heads", "2", "--max-length", "48", "--batch-size", "2", "--steps", "2",
         "--warmup-steps", "1"]


@pytest.mark.slow  # both frameworks' full runs; gpu_check --dry-run runs the script in CI
def test_micro_run_reports_real_numbers_for_both_frameworks(tmp_path):
    out, report = tmp_path / "bench.json", tmp_path / "BENCH.md"
    report.write_text("# Kept\n\n<!-- benchmark:results:start -->\nold\n<!-- benchmark:results:end -->\n\nAlso kept.\n")
    benchmark.main([*MICRO, "--objectives", "dpo", "--json", str(out), "--markdown", str(report)])
    summary = json.loads(out.read_text())

    assert [(r["framework"], r["objective"]) for r in summary["runs"]] == [("prefmodule", "dpo")] + [("trl", "dpo")] * HAS_TRL
    planned = summary["data"]["non_pad_tokens_per_step"]
    assert len(planned) == 3 and all(tokens > 0 for tokens in planned)
    for run in summary["runs"]:
        assert run["batch_tokens"] == planned  # every framework trained the same batches, in order
        assert len(run["step_times_s"]) == 2 and all(0 < t < 60 for t in run["step_times_s"])
        assert run["median_step_s"] == statistics.median(run["step_times_s"])
        assert run["tokens_per_s"] == pytest.approx(sum(planned[1:]) / sum(run["step_times_s"]))
        assert 100 < run["peak_memory_mb"] < 20_000  # RSS of a process that imported torch
        assert run["memory_at_start_mb"] < run["peak_memory_mb"]
        assert run["total_s"] > sum(run["step_times_s"])
        assert run["time_vs_floor"] > 1 and 0 < run["mfu"] < 1  # nothing beats the matmul floor
        assert run["time_vs_scored_floor"] > run["time_vs_floor"]
    if HAS_TRL:
        ours, trl = summary["runs"]
        assert ours["time_vs_trl"] == pytest.approx(ours["median_step_s"] / trl["median_step_s"])
        assert ours["memory_vs_trl"] == pytest.approx(ours["peak_memory_mb"] / trl["peak_memory_mb"])
    assert summary["runs"][0]["packed"] is True  # prefmodule's default on a sdpa Llama: packed rows
    assert summary["matmul_flops_per_s"] > 1e8 and summary["versions"]["torch"]
    assert summary["targets"] == []  # the targets are judged at the default shape only

    text = report.read_text()
    assert text.startswith("# Kept\n") and text.endswith("Also kept.\n") and "\nold\n" not in text
    assert "| dpo | prefmodule (packed) |" in text and "--vocab-size 256" in text


def test_forward_flops_count_matmuls_and_causal_attention():
    config = dict(vocab_size=100, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1)
    pair = {"prompt_ids": [5] * 3, "chosen_ids": [6] * 2, "rejected_ids": [7] * 4}
    layer = 8 * (8 + 4 + 4 + 8) + 3 * 8 * 16  # q, k, v, o (kv heads of size 4) and the gated MLP
    per_token = 2 * (2 * layer + 8 * 100)
    attention = sum(2 * 2 * 8 * length**2 for length in (5, 7))
    assert benchmark.forward_flops(config, [pair]) == (5 + 7) * per_token + attention
    scored = benchmark.forward_flops(config, [pair], scored_head_only=True)
    assert benchmark.forward_flops(config, [pair]) - scored == 2 * 8 * 100 * (3 + 3)  # the prompt positions' head
    assert benchmark.step_flops(config, [pair], live_reference=True) == 4 * benchmark.forward_flops(config, [pair])


def test_synthetic_pairs_are_seeded_right_skewed_and_fit():
    pairs = benchmark.synthetic_pairs(400, vocab_size=1000, max_length=512, seed=3)
    assert pairs == benchmark.synthetic_pairs(400, vocab_size=1000, max_length=512, seed=3)
    lengths = [len(p["prompt_ids"]) + len(p[k]) for p in pairs for k in ("chosen_ids", "rejected_ids")]
    assert max(lengths) <= 512
    assert statistics.mean(lengths) > statistics.median(lengths)  # log-normal: a long right tail
    assert all(p["chosen_ids"][-1] == benchmark.EOS_ID and p["rejected_ids"][-1] == benchmark.EOS_ID for p in pairs)
    assert all(2 < t < 1000 for p in pairs for t in p["prompt_ids"])  # no special ids inside the text
    assert 50 < statistics.median(len(p["prompt_ids"]) for p in pairs) < 75  # 12% of max_length
    assert 80 < statistics.median(len(p["chosen_ids"]) for p in pairs) < 105  # 18% of max_length


def test_other_objectives_train_the_planned_batches(tmp_path):
    """In this process, to stay fast: prefmodule's ORPO and SimPO, and TRL's ORPOTrainer when installed."""
    settings, _ = benchmark.parse_args(MICRO)
    benchmark.build_model(settings, tmp_path / "model")
    pairs = benchmark.synthetic_pairs(6, vocab_size=256, max_length=48, seed=0)
    planned = [sum(2 * len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in batch)
               for batch in benchmark.batches(pairs, 2)]
    runs = [benchmark.run_prefmodule(objective, settings, str(tmp_path / "model"), pairs)
            for objective in ("orpo", "simpo")]
    if HAS_TRL:
        runs.append(benchmark.run_trl("orpo", settings, str(tmp_path / "model"), pairs))
    for run in runs:
        assert run["batch_tokens"] == planned
        assert len(run["step_times_s"]) == 2 and all(t > 0 for t in run["step_times_s"])
        assert run["peak_memory_mb"] > 100


GRPO_TINY = ["--model", "asset://tiny-llama", "--objectives", "grpo", "--num-generations", "2",
             "--max-completion-length", "8", "--batch-size", "2", "--steps", "1", "--warmup-steps", "1"]


def test_grpo_tiny_run_reports_sampled_tokens_and_ratios_for_both_frameworks(tmp_path):
    """GRPO against TRL's GRPOTrainer on the tiny model: 2 prompts of the arithmetic asset per step, G = 2, at most
    8 tokens, 1 warm-up and 1 timed step, each framework in its own process (about 25 s on 2 cores)."""
    out, report = tmp_path / "grpo.json", tmp_path / "BENCH.md"
    report.write_text("# Kept\n\n<!-- benchmark:grpo:start -->\nold\n<!-- benchmark:grpo:end -->\n\nAlso kept.\n")
    benchmark.main([*GRPO_TINY, "--json", str(out), "--markdown", str(report)])
    summary = json.loads(out.read_text())

    runs = summary["runs"]
    assert [(r["framework"], r["objective"]) for r in runs] == [("prefmodule", "grpo")] + [("trl", "grpo")] * HAS_TRL
    for run in runs:
        assert len(run["step_times_s"]) == 1 and 0 < run["median_step_s"] < 60
        assert len(run["prompt_ids"]) == 2 and all(len(step) == 2 for step in run["prompt_ids"])  # 2 prompts a step
        assert run["prompt_ids"] == runs[0]["prompt_ids"]  # the same prompt ids, step by step
        assert [len(step) for step in run["completion_lengths"]] == [4, 4]  # 2 prompts x G = 2
        assert all(1 <= n <= 8 for step in run["completion_lengths"] for n in step)
        assert run["sampled_tokens"] == [sum(step) for step in run["completion_lengths"]]
        assert run["timed_sampled_tokens"] == run["sampled_tokens"][1:] and run["timed_sampled_tokens"][0] > 0
        assert run["sampled_tokens_per_s"] == pytest.approx(run["timed_sampled_tokens"][0] / run["step_times_s"][0])
        assert run["ms_per_sampled_token"] == pytest.approx(1e3 / run["sampled_tokens_per_s"])
        assert run["decode_steps"] == [max(run["completion_lengths"][1])]
        assert 100 < run["peak_memory_mb"] < 20_000 and run["memory_at_start_mb"] < run["peak_memory_mb"]
    if HAS_TRL:
        ours, trl = runs
        assert ours["time_vs_trl"] == pytest.approx(ours["median_step_s"] / trl["median_step_s"])
        assert ours["cpu_time_vs_trl"] == pytest.approx(ours["median_step_cpu_s"] / trl["median_step_cpu_s"])
        per_token = ours["ms_per_sampled_token"] / trl["ms_per_sampled_token"]
        assert ours["time_per_token_vs_trl"] == pytest.approx(per_token)
        assert ours["memory_vs_trl"] == pytest.approx(ours["peak_memory_mb"] / trl["peak_memory_mb"])
        assert "time_vs_trl" not in trl
    assert summary["sampling"] == {"temperature": 0.7, "top_p": 1.0, "top_k": 50, "max_completion_length": 8}
    assert summary["data"]["completions_per_step"] == 4 and summary["targets"] == []  # judged on SmolLM2 only

    text = report.read_text()  # --section defaults to grpo for --objectives grpo
    assert text.startswith("# Kept\n") and text.endswith("Also kept.\n") and "\nold\n" not in text
    assert "| prefmodule (packed) |" in text and ("| trl |" in text) == HAS_TRL and "--num-generations 2" in text


def test_grpo_is_measured_on_its_own_with_a_pretrained_model():
    with pytest.raises(SystemExit, match="--objectives grpo"):
        benchmark.main(["--model", "asset://tiny-llama", "--objectives", "dpo", "grpo"])
    with pytest.raises(SystemExit, match="--model"):
        benchmark.main(["--objectives", "grpo"])


def test_grpo_reward_scores_trl_message_completions_as_prefmodule_scores_texts():
    reward = benchmark.reward_function("prefmodule.sampling.rules:exact_match")
    prompts = [[{"role": "user", "content": "What is 2 + 3?"}]] * 2
    texts = ["The answer is 5.", "The answer is 6."]
    as_messages = [[{"role": "assistant", "content": text}] for text in texts]
    trl_extras = dict(trainer_state=object(), log_extra=print, log_metric=print)  # TRL's own keywords: not passed on
    assert reward(prompts, as_messages, completion_ids=[[1], [2]], answer=["5", "5"], **trl_extras) == [1.0, 0.0]
    assert reward(prompts, texts, completion_ids=[[1], [2]], answer=["5", "5"]) == [1.0, 0.0]
    assert reward.__name__ == "exact_match"
