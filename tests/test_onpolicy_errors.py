"""The on-policy paths keep the promise the offline ones keep: a user's mistake is one line and exit code 2, before
any weights load where it can be known then, and no earlier output file is damaged. Sampled pairs
(``configs/sample_pairs.yaml``), Online DPO (``configs/online_dpo.yaml``), rewards and ``scripts/iterative_dpo.py``,
each driven through the CLI as a user runs it."""

import json
import math
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest

from prefmodule.cli import main
from prefmodule.objectives.base import PreferenceModule
from prefmodule.sampling.scorers import FunctionScorer, RewardError

from conftest import read_jsonl, write_jsonl
from test_cli import fails_with
from test_disk import exhaust_space, small_disk

CONFIGS = Path(__file__).parent.parent / "configs"
SCRIPTS = Path(__file__).parent.parent / "scripts"
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.accelerator=cpu"]
FEW = ["--model.max_new_tokens=4", "--model.num_completions=2"]  # 4 prompts: 8 completions, rows 0-3

REWARDS = '''import math
import os

from prefmodule.sampling.rules import politeness


def raises(prompts, completions):
    return [1 / 0 for _ in completions]


def short(prompts, completions):
    return [1.0] * (len(completions) - 1)


def nan(prompts, completions):
    return [math.nan] * len(completions)


def inf(prompts, completions):
    return [0.0, 0.5, 1.0, math.inf] + [0.0] * (len(completions) - 4)


def text(prompts, completions):
    return ["1"] * len(completions)


def bools(prompts, completions):
    return [True] * len(completions)


def nones(prompts, completions):
    return [None] * len(completions)


def scalar(prompts, completions):
    return 1.0


def mapping(prompts, completions):
    return {"score": 1.0}


def nothing(prompts, completions):
    pass


def one_argument(completions):
    return [1.0] * len(completions)


def down_on_row_4(prompts, completions):
    """The shipped rule, until the grader goes down on one prompt (``GRADER_DOWN`` names it)."""
    if os.environ.get("GRADER_DOWN") in prompts:
        raise ConnectionError("the grader is down")
    return politeness(prompts, completions)
'''


@pytest.fixture
def prompts(tmp_path, demo_rows):
    """6 distinct prompts alone (the ``prompts`` format) and their texts."""
    texts = list(dict.fromkeys(row["prompt"] for row in demo_rows))[:6]
    return write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": text} for text in texts]), texts


@pytest.fixture
def rewards(tmp_path):
    path = tmp_path / "rewards.py"
    path.write_text(REWARDS)
    return str(path)


@pytest.fixture
def no_weights(monkeypatch):
    """The policy's weights must not load: a mistake known from the configuration is refused before."""
    def refuse(*args, **kwargs):
        raise AssertionError("the policy's weights were loaded")

    monkeypatch.setattr(PreferenceModule, "load_model", refuse)


def sample_args(root, data, *extra):
    return ["predict", "--config", str(CONFIGS / "sample_pairs.yaml"), f"--data.predict={data}",
            f"--trainer.default_root_dir={root}", *FEW, *QUIET, *extra]


def online_args(root, data, *extra):
    return ["fit", "--config", str(CONFIGS / "online_dpo.yaml"), f"--data.train={data}", f"--data.val={data}",
            "--data.batch_size=2", "--trainer.max_steps=1", "--model.max_new_tokens=4", "--samples.num_prompts=0",
            f"--trainer.default_root_dir={root}", *QUIET, *extra]


def line(source: str, name: str) -> int:
    """The line of ``REWARDS`` that holds ``source`` inside function ``name`` (1-based)."""
    lines = REWARDS.splitlines()
    start = lines.index(next(text for text in lines if text.startswith(f"def {name}(")))
    return start + 1 + next(i for i, text in enumerate(lines[start:]) if source in text)


# ----- reward functions ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, said", [
    ("short", "returned 7 scores for the 8 completions of rows 0-3: it must return one score per completion"),
    ("nan", "returned nan for completion 1 of 2 of row 0: a score must be finite"),
    ("inf", "returned inf for completion 2 of 2 of row 1: a score must be finite"),
    ("text", "returned '1' (str) for completion 1 of 2 of row 0: a score is an int or a float"),
    ("bools", "returned True (bool) for completion 1 of 2 of row 0: a score is an int or a float"),
    ("nones", "returned None (NoneType) for completion 1 of 2 of row 0: a score is an int or a float"),
    ("scalar", "returned 1.0 (float) for the 8 completions of rows 0-3: it must return a list of scores, one per "
               "completion"),
    ("mapping", "returned {'score': 1.0} (dict) for the 8 completions of rows 0-3: it must return a list of scores, "
                "one per completion"),
    ("nothing", "returned None (NoneType) for the 8 completions of rows 0-3: it must return a list of scores, one "
                "per completion"),
])
def test_a_reward_functions_wrong_answer_is_one_line_naming_it_the_row_and_what(name, said, tmp_path, prompts,
                                                                                  rewards, capsys):
    data, _ = prompts
    write_jsonl(tmp_path / "four.jsonl", read_jsonl(data)[:4])
    earlier = tmp_path / "pairs.jsonl"
    earlier.write_text('{"an": "earlier file"}\n')
    code, error = fails_with(capsys, *sample_args(tmp_path / "run", tmp_path / "four.jsonl",
                                                  f"--model.reward={rewards}:{name}", f"--model.pairs_path={earlier}"))
    assert (code, error) == (2, f"prefmodule: error: reward function {rewards}:{name} {said}")
    assert earlier.read_text() == '{"an": "earlier file"}\n'  # untouched
    assert not (tmp_path / "pairs.partial.jsonl").exists()  # the first batch failed: nothing to keep


def test_a_reward_function_that_raises_is_named_with_its_own_last_frame(tmp_path, prompts, rewards, capsys):
    data, _ = prompts
    code, error = fails_with(capsys, *online_args(tmp_path, data, f"--model.reward={rewards}:raises"))
    assert (code, error) == (2, f"prefmodule: error: reward function {rewards}:raises failed on the 4 completions of "
                                f"rows 0-1: ZeroDivisionError: division by zero (at {rewards}:"
                                f"{line('1 / 0', 'raises')})")


def test_wrong_signature_and_syntax_error_are_one_line_before_any_weights_load(tmp_path, prompts, rewards, capsys,
                                                                               no_weights):
    data, _ = prompts
    code, error = fails_with(capsys, *sample_args(tmp_path, data, f"--model.reward={rewards}:one_argument"))
    assert (code, error) == (2, f"prefmodule: error: model.reward: reward function {rewards}:one_argument(completions) "
                                "cannot be called as function(prompts, completions) (too many positional arguments)")
    broken = tmp_path / "broken.py"
    broken.write_text("def score(prompts, completions)\n    return [0.0] * len(completions)\n")
    code, error = fails_with(capsys, *online_args(tmp_path, data, f"--model.reward={broken}:score"))
    assert (code, error) == (2, f"prefmodule: error: model.reward='{broken}:score': a syntax error at {broken}:1: "
                                "expected ':'")


def test_none_is_a_score_only_where_the_caller_allows_it():
    def judge(prompts, completions):
        return [None, 1]

    assert FunctionScorer(judge)  # the signature is fine
    with pytest.raises(RewardError, match=r"returned None \(NoneType\) for completion 1 of 2: a score is an int or a "
                                          r"float$"):
        FunctionScorer(judge)(["p", "p"], ["a", "b"])
    scores = FunctionScorer(judge, allow_none=True)(["p", "p"], ["a", "b"])
    assert math.isnan(scores[0]) and scores[1] == 1.0


# ----- reward models ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dpo_checkpoint(tmp_path_factory, demo_rows):
    """A DPO fit's checkpoint (one step)."""
    root = tmp_path_factory.mktemp("dpo")
    pairs = write_jsonl(root / "pairs.jsonl", demo_rows[:8])
    main(["fit", "--config", str(CONFIGS / "dpo.yaml"), f"--data.train={pairs}", "--trainer.max_steps=1",
          "--data.batch_size=4", "--samples.num_prompts=0", "--export.enabled=false", f"--trainer.default_root_dir={root}",
          f"--data.cache_dir={root / 'cache'}", *QUIET])
    return str(root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt")


def test_what_cannot_be_a_reward_model_is_refused_before_the_policy_loads(tmp_path, prompts, dpo_checkpoint, capsys,
                                                                          no_weights):
    data, _ = prompts
    (tmp_path / "empty").mkdir()
    (tmp_path / "tokenizer_only").mkdir()
    (tmp_path / "tokenizer_only" / "tokenizer.json").write_text("{}")
    (tmp_path / "two_labels").mkdir()
    (tmp_path / "two_labels" / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForSequenceClassification"], "id2label": {"0": "bad", "1": "good"}}))
    refused = {
        "asset://tiny-llama": "LlamaForCausalLM is a causal LM, not a reward model (one score per text: a "
                              "sequence-classification head with one label, as configs/reward.yaml trains and exports)",
        dpo_checkpoint: "a checkpoint of prefmodule.DPOModule, not of a RewardModule; a reward model is a "
                        "RewardModule's checkpoint or export (configs/reward.yaml)",
        str(tmp_path / "empty"): "the folder is empty (a RewardModule's export is its run's <log dir>/hf_model)",
        str(tmp_path / "tokenizer_only"): "no config.json in that folder: not a model (a RewardModule's export is "
                                          "its run's <log dir>/hf_model)",
        str(tmp_path / "two_labels"): "LlamaForSequenceClassification has 2 labels; a reward model has one (a single "
                                      "score per text)",
    }
    for reward, why in refused.items():
        code, error = fails_with(capsys, *sample_args(tmp_path, data, f"--model.reward={reward}"))
        assert (code, error) == (2, f"prefmodule: error: model.reward={reward!r}: {why}")
    code, error = fails_with(capsys, *online_args(tmp_path, data, "--model.reward=asset://tiny-llama"))
    assert code == 2 and error.endswith("LlamaForCausalLM is a causal LM, not a reward model (one score per text: a "
                                        "sequence-classification head with one label, as configs/reward.yaml trains "
                                        "and exports)")


def test_a_checkpoint_of_another_objective_is_refused_naming_both(tmp_path, prompts, dpo_checkpoint, capsys,
                                                                  no_weights):
    data, _ = prompts
    code, error = fails_with(capsys, *sample_args(tmp_path, data, f"--ckpt_path={dpo_checkpoint}"))
    assert (code, error) == (2, f"prefmodule: error: ckpt_path={dpo_checkpoint!r} is a checkpoint of "
                                "prefmodule.DPOModule, and the configuration's model is prefmodule.SamplePairsModule: a "
                                "checkpoint resumes or evaluates its own objective. Give a checkpoint of a "
                                "SamplePairsModule run, or start SamplePairsModule from that run's policy with "
                                "--model.model=<its log dir>/hf_model.")
    code, error = fails_with(capsys, *online_args(tmp_path, data, f"--ckpt_path={dpo_checkpoint}"))
    assert code == 2 and "is a checkpoint of prefmodule.DPOModule, and the configuration's model is " \
                         "prefmodule.OnlineDPOModule" in error


# ----- settings and data --------------------------------------------------------------------------------------
def test_temperature_0_with_several_completions_is_a_settings_error(tmp_path, prompts, capsys, no_weights):
    data, _ = prompts
    code, error = fails_with(capsys, *sample_args(tmp_path, data, "--model.temperature=0"))
    assert (code, error) == (2, "prefmodule: error: model.temperature=0.0: decodes greedily, and the 2 completions of "
                                "a prompt would all be the same (nothing to compare); sample at a temperature > 0 "
                                "(e.g. 1.0).")
    code, error = fails_with(capsys, *online_args(tmp_path, data, "--model.temperature=0"))
    assert code == 2 and error.startswith("prefmodule: error: model.temperature=0.0: decodes greedily, and the 2 "
                                          "completions of a prompt would all be the same")


def test_empty_prompts_are_dropped_and_counted(tmp_path, prompts, caplog):
    _, texts = prompts
    data = write_jsonl(tmp_path / "some_empty.jsonl", [{"prompt": texts[0]}, {"prompt": "  \n"}, {"prompt": texts[1]},
                                                       {"prompt": ""}])
    cli = main(sample_args(tmp_path, data, f"--model.pairs_path={tmp_path / 'pairs.jsonl'}"))
    assert (f"predict <- {data} (prompts format): 4 rows read, 2 prompts kept, 2 dropped (2 empty prompt)"
            in caplog.text)
    summary = next(c for c in cli.trainer.callbacks if hasattr(c, "summary")).summary
    assert summary["prompts"] == 2
    assert {pair["prompt"] for pair in read_jsonl(tmp_path / "pairs.jsonl")} <= set(texts[:2])
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": [{"role": "user", "content": texts[0]}]},
                                                 {"prompt": [{"role": "user", "content": " "}]}])
    main(online_args(tmp_path / "online", chat))
    assert f"train <- {chat} (prompts (messages) format): 2 rows read, 1 prompts kept, 1 dropped (1 empty prompt)" \
        in caplog.text


# ----- output files -------------------------------------------------------------------------------------------
def test_an_output_path_that_cannot_be_written_is_refused_before_the_weights_load(tmp_path, prompts, small_data,
                                                                                   capsys, no_weights):
    data, _ = prompts
    before = Path(data).read_bytes()
    cases = {
        str(tmp_path): f"is a folder: give a file path (e.g. {tmp_path / 'out.jsonl'})",
        f"{data}/pairs.jsonl": f"lies under {data}, which is a file: give a path in a folder",
        data: "is a data file this run reads: writing it would overwrite that data; give another path",
    }
    for path, why in cases.items():
        code, error = fails_with(capsys, *sample_args(tmp_path, data, f"--model.pairs_path={path}"))
        assert (code, error) == (2, f"prefmodule: error: model.pairs_path={path!r} {why}")
    assert Path(data).read_bytes() == before
    train, val = small_data
    code, error = fails_with(capsys, "predict", "--config", str(CONFIGS / "dpo.yaml"), f"--data.predict={val}",
                             f"--predictions.path={val}", f"--trainer.default_root_dir={tmp_path}", *QUIET)
    assert (code, error) == (2, f"prefmodule: error: predictions.path={val!r} is a data file this run reads: "
                                "writing it would overwrite that data; give another path")


def test_a_read_only_folder_is_refused_before_the_weights_load(tmp_path, prompts, capsys, no_weights):
    data, _ = prompts
    folder = tmp_path / "read_only"
    folder.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(["mount", "--bind", str(folder), str(folder)]).returncode == 0 \
        and subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)]).returncode == 0
    if not mounted:
        os.chmod(folder, 0o555)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("no read-only folder here (root without mount)")
        code, error = fails_with(capsys, *sample_args(tmp_path, data, f"--model.pairs_path={folder / 'pairs.jsonl'}"))
    finally:
        subprocess.run(["umount", str(folder)], capture_output=True)
        os.chmod(folder, 0o755)
    assert (code, error) == (2, f"prefmodule: error: model.pairs_path={str(folder / 'pairs.jsonl')!r}: no permission "
                                f"to write in {folder}; write elsewhere")


class FillDiskBeforeThePairs(L.Callback):
    """When sampling ends, before the pairs are written: fills the disk under ``path`` (a tmpfs), or caps the size
    of any file this process writes below the pairs file's."""

    def __init__(self, path: str, tmpfs: bool):
        self.path, self.tmpfs = path, tmpfs

    def on_predict_epoch_end(self, trainer, pl_module):
        exhaust_space(self.path, self.tmpfs, 64)


def test_a_full_disk_leaves_the_earlier_pairs_whole_and_keeps_the_samples(tmp_path, prompts, capsys):
    data, _ = prompts
    disk = tmp_path / "disk"
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    with small_disk(disk) as tmpfs:
        pairs = disk / "pairs.jsonl"
        earlier = "".join(f'{{"prompt": "earlier {i}", "chosen": "a", "rejected": "b"}}\n' for i in range(3))
        pairs.write_text(earlier)
        try:
            code, error = fails_with(capsys, *sample_args(tmp_path, data, f"--model.pairs_path={pairs}",
                                                          "--trainer.callbacks+=test_onpolicy_errors.FillDiskBeforeThePairs",
                                                          f"--trainer.callbacks.path={disk}",
                                                          f"--trainer.callbacks.tmpfs={tmpfs}"))
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, limit)
            signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
        reason = ("No space left on device; free space on that disk, or write elsewhere (e.g. "
                  "`--trainer.default_root_dir`)." if tmpfs else "File too large; the file exceeds the size limit for "
                                                                  "this process (`ulimit -f`) or file system.")
        partial = disk / "pairs.partial.jsonl"
        assert (code, error) == (2, f"prefmodule: error: could not write the pairs to {pairs}: {reason} (The 6 prompts "
                                    f"sampled are kept in {partial}: --model.resume_partial={partial} continues from "
                                    "them.)")
        assert pairs.read_text() == earlier  # whole, as it was
        assert sorted(path.name for path in disk.iterdir() if path.name != "filler") == ["pairs.jsonl",
                                                                                         "pairs.partial.jsonl"]
        assert [row["index"] for row in read_jsonl(partial)] == list(range(6))


def test_a_failed_run_keeps_its_batches_and_resume_partial_finishes_as_one_run_would(tmp_path, prompts, rewards,
                                                                                      capsys, monkeypatch):
    data, texts = prompts
    reward = f"--model.reward={rewards}:down_on_row_4"
    whole = main(sample_args(tmp_path / "whole", data, reward, "--data.eval_batch_size=2",
                             f"--model.pairs_path={tmp_path / 'whole.jsonl'}"))
    assert next(c for c in whole.trainer.callbacks if hasattr(c, "summary")).summary["prompts"] == 6
    pairs, partial = tmp_path / "pairs.jsonl", tmp_path / "pairs.partial.jsonl"
    monkeypatch.setenv("GRADER_DOWN", texts[4])
    code, error = fails_with(capsys, *sample_args(tmp_path / "run", data, reward, "--data.eval_batch_size=2",
                                                  f"--model.pairs_path={pairs}"))
    assert (code, error) == (2, f"prefmodule: error: reward function {rewards}:down_on_row_4 failed on the 4 "
                                "completions of rows 4-5: ConnectionError: the grader is down (at "
                                f"{rewards}:{line('raise ConnectionError', 'down_on_row_4')}) (The 4 prompts "
                                f"sampled are kept in {partial}: --model.resume_partial={partial} continues from them.)")
    assert not pairs.exists() and [row["index"] for row in read_jsonl(partial)] == [0, 1, 2, 3]
    monkeypatch.delenv("GRADER_DOWN")
    resumed = main(sample_args(tmp_path / "run", data, reward, "--data.eval_batch_size=2",
                               f"--model.pairs_path={pairs}", f"--model.resume_partial={partial}"))
    assert next(c for c in resumed.trainer.callbacks if hasattr(c, "summary")).summary["resumed"] == 4
    assert pairs.read_bytes() == (tmp_path / "whole.jsonl").read_bytes()  # as the run that never stopped
    assert not partial.exists()


def test_ctrl_c_while_sampling_keeps_the_finished_batches_and_says_where(tmp_path, prompts):
    data, _ = prompts
    slow = tmp_path / "slow.py"
    slow.write_text("import os, time\nfrom prefmodule.sampling.rules import politeness\nCALLS = []\n\n\n"
                    "def slow(prompts, completions):\n    CALLS.append(1)\n    if len(CALLS) == 3:\n"
                    "        open(os.environ['MARKER'], 'w').close()\n        time.sleep(120)\n"
                    "    return politeness(prompts, completions)\n")
    marker, pairs = tmp_path / "sampling_batch_3", tmp_path / "pairs.jsonl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MARKER": str(marker)}
    process = subprocess.Popen([sys.executable, "-m", "prefmodule", *sample_args(tmp_path, data, f"--model.reward={slow}:slow",
                                "--data.eval_batch_size=2", f"--model.pairs_path={pairs}")],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while not marker.exists() and process.poll() is None:  # two batches sampled, the third being scored
            time.sleep(0.1)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    partial = tmp_path / "pairs.partial.jsonl"
    assert process.returncode == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"prefmodule: interrupted; the 4 prompts sampled are kept in {partial}: "
                                            f"--model.resume_partial={partial} continues from them.")
    assert [row["index"] for row in read_jsonl(partial)] == [0, 1, 2, 3] and not pairs.exists()


# ----- iterative DPO ------------------------------------------------------------------------------------------
def test_iterative_dpo_records_each_round_names_a_failed_step_and_resumes(tmp_path, prompts, rewards, capsys,
                                                                          monkeypatch):
    sys.path.insert(0, str(SCRIPTS))
    from iterative_dpo import main as iterate

    data, texts = prompts
    held_out = write_jsonl(tmp_path / "held_out.jsonl", [{"prompt": text} for text in texts[:4]])
    out = tmp_path / "runs"
    args = ["--rounds", "1", "--prompts", data, "--held-out", held_out, "--out", str(out),
            "--reward", f"{rewards}:down_on_row_4", "--sample-args=--model.max_new_tokens=4 --model.num_completions=2"]
    with pytest.raises(SystemExit) as exit_:
        iterate(["--rounds", "-1"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == ("iterative DPO: error: --rounds=-1: give the number of rounds of sample and DPO, "
                                       ">= 0 (0 scores the policy alone)\n")

    monkeypatch.setenv("GRADER_DOWN", texts[4])  # not a held-out prompt: round 0 ends, round 1's sampling fails
    with pytest.raises(SystemExit) as exit_:
        iterate(args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert [text for text in err.splitlines() if "error" in text or "iterative" in text][-2:] == [
        f"prefmodule: error: reward function {rewards}:down_on_row_4 failed on the 12 completions of rows 0-5: "
        f"ConnectionError: the grader is down (at {rewards}:{line('raise ConnectionError', 'down_on_row_4')})",
        "iterative DPO: round 1 failed in its sample step (exit 2); the rounds before it are recorded: --resume "
        "continues at round 1"]
    round_0 = (out / "rounds.json").read_text()
    assert [r["round"] for r in json.loads(round_0)] == [0]

    monkeypatch.delenv("GRADER_DOWN")
    with pytest.raises(SystemExit) as exit_:  # without --resume nothing recorded is overwritten
        iterate(args)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"iterative DPO: error: {out / 'rounds.json'} records 1 round(s) of an earlier run: --resume continues it, "
        "another --out starts afresh")
    assert (out / "rounds.json").read_text() == round_0
    records = iterate([*args, "--resume"])
    assert [r["round"] for r in records] == [0, 1] and records[1]["policy"].endswith("hf_model")
    assert records[1]["sampled_tokens"] > 0 and json.loads(round_0)[0] == records[0]
    assert json.loads((out / "rounds.json").read_text()) == records
