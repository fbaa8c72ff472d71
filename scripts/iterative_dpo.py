"""Iterative DPO (Xiong et al., 2023, arXiv 2312.11456; Llama 3, arXiv 2407.21783): rounds of sample, score, DPO,
each round starting from the last round's policy, with it as the reference.

Round k: ``predict`` with ``configs/sample_pairs.yaml`` draws completions of the training prompts from policy_k and
keeps best vs worst by the reward; ``fit`` with ``configs/dpo.yaml`` trains policy_k one epoch on those pairs,
against a frozen copy of policy_k, and its export is policy_{k+1}. Before the first round and after each, the policy's
held-out prompts are sampled and scored: the mean reward, round after round, and the tokens sampled to get there.

    python scripts/iterative_dpo.py --rounds 3 --out runs/iterative
    python scripts/iterative_dpo.py --policy my-sft-model --reward my_rewards:exact_match --prompts train.jsonl \\
        --held-out val.jsonl --rounds 2

``--sample-args=...`` and ``--dpo-args=...`` pass more options to the two commands (``--dpo-args="--model.beta=0.2
--trainer.max_epochs=2"``).

Each round is recorded in ``<out>/rounds.json`` as it ends (the file replaced whole). A round that fails says which
round and which step (sample, train, held-out); ``--resume`` continues at the first round not recorded there (more
rounds than recorded: ``--rounds`` counts from the start). Without ``--resume`` an ``--out`` that holds rounds is
refused: nothing recorded is overwritten.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIGS = REPO_ROOT / "configs"
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
DPO_ROUND = ["--trainer.max_epochs=1"]  # one pass over each round's pairs (``--dpo-args`` may say otherwise)


def sample(policy: str, reward: str, prompts: str, out: Path, extra: list[str], seed: int) -> dict:
    """``predict`` with ``sample_pairs.yaml``: the pairs file and the writer's summary (scores, tokens sampled)."""
    from prefmodule.cli import main
    from prefmodule.sampling.pairs import PairsWriter

    cli = main(["predict", "--config", str(CONFIGS / "sample_pairs.yaml"), f"--model.model={policy}",
                f"--model.reward={reward}", f"--data.predict={prompts}", f"--trainer.default_root_dir={out}",
                f"--model.pairs_path={out / 'pairs.jsonl'}", f"--model.generation_seed={seed}", *QUIET, *extra])
    return next(c for c in cli.trainer.callbacks if isinstance(c, PairsWriter)).summary


def train(policy: str, pairs: str, out: Path, extra: list[str]) -> str:
    """``fit`` with ``dpo.yaml`` from ``policy`` (a frozen copy of it the reference) on ``pairs``; its export."""
    from prefmodule.cli import main

    cli = main(["fit", "--config", str(CONFIGS / "dpo.yaml"), f"--model.model={policy}", f"--data.train={pairs}",
                f"--trainer.default_root_dir={out}", "--samples.num_prompts=0", *QUIET, *DPO_ROUND, *extra])
    return str(Path(cli.trainer.log_dir) / "hf_model")


def iterate(policy: str, reward: str, prompts: str, held_out: str, rounds: int, out: Path, sample_args: list[str],
            dpo_args: list[str], resume: bool = False) -> list[dict]:
    """Run the rounds; one record per policy (round 0: the start): its held-out mean reward, and the tokens
    sampled (for pairs, not for the held-out measure) before it. Round k (k >= 1) samples pairs from round k-1's
    policy and trains it on them; every round then scores its policy on the held-out prompts. Each record goes to
    ``out/rounds.json`` as its round ends; ``resume`` starts after the rounds recorded there."""
    path = out / "rounds.json"
    records = recorded(path, policy, resume)
    for k in range(len(records), rounds + 1):
        sampled = 0
        if k:
            start = records[-1]
            pairs = step(k, "sample", sample, start["policy"], reward, prompts, out / f"round{k}" / "pairs",
                         sample_args, seed=k)
            policy = step(k, "train", train, start["policy"], pairs["path"], out / f"round{k}" / "dpo", dpo_args)
            sampled = start["sampled_tokens"] + pairs["sampled_tokens"]
        held = step(k, "held-out", sample, policy, reward, held_out, out / f"round{k}" / "held_out", sample_args,
                    seed=0)
        records.append({"round": k, "policy": policy, "held_out_mean_reward": held["mean_score"],
                        "held_out_score_std": held["score_std"], "sampled_tokens": sampled})
        write_records(path, records)
        print(f"iterative DPO: round {k}: held-out mean reward {held['mean_score']:.3f} "
              f"(std {held['score_std']:.3f}) after {sampled} sampled tokens -> {path}", flush=True)
    return records


def step(k: int, name: str, run, *args, **kwargs):
    """``run(*args, **kwargs)``, step ``name`` of round ``k``: a failure names the round and the step."""
    try:
        return run(*args, **kwargs)
    except SystemExit as stop:  # the CLI has printed the error itself
        if stop.code not in (0, None):
            print(f"iterative DPO: round {k} failed in its {name} step (exit {stop.code}); the rounds before it are "
                  f"recorded: --resume continues at round {k}", file=sys.stderr)
        raise
    except Exception as error:
        from prefmodule.errors import add_note

        add_note(error, f"iterative DPO: round {k} failed in its {name} step; --resume continues at round {k}")
        raise


def recorded(path: Path, policy: str, resume: bool) -> list[dict]:
    """The rounds ``path`` records, to continue after (``resume``), checked; without ``resume`` there must be none."""
    if not path.exists():
        return []
    try:
        records = json.loads(path.read_text())
        rounds = [record["round"] for record in records]
    except (OSError, ValueError, TypeError, KeyError) as error:
        fail(f"{path} is not a record of rounds ({error}); give another --out")
    if not resume:
        fail(f"{path} records {len(records)} round(s) of an earlier run: --resume continues it, another --out starts "
             "afresh")
    if rounds != list(range(len(rounds))) or (records and records[0]["policy"] != policy):
        fail(f"{path} records rounds {rounds} from the policy {records[0]['policy'] if records else None}, not a "
             f"run from {policy}: resume with its --policy, or give another --out")
    return records


def write_records(path: Path, records: list[dict]) -> None:
    """``records`` as ``path``, replaced whole (a failed write leaves the earlier file as it was)."""
    from prefmodule.errors import writing
    from prefmodule.training.checkpoints import replacing

    path.parent.mkdir(parents=True, exist_ok=True)
    with writing(path, "the rounds"), replacing(path) as partial:
        Path(partial).write_text(json.dumps(records, indent=2))


def fail(message: str) -> None:
    """A mistake in the script's arguments: one line, exit code 2 (as the CLI's)."""
    print(f"iterative DPO: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", default="asset://tiny-llama", help="the starting policy (folder or hub id)")
    parser.add_argument("--reward", default="prefmodule.sampling.rules:politeness",
                        help="a reward model (folder, RewardModule .ckpt) or a function module:function")
    parser.add_argument("--prompts", default="asset://demo/train.jsonl", help="the prompts pairs are sampled for")
    parser.add_argument("--held-out", default="asset://demo/val.jsonl", help="the prompts each policy is scored on")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of sample and DPO (0: score the policy alone)")
    parser.add_argument("--out", type=Path, default=Path("runs/iterative"))
    parser.add_argument("--sample-args", default="", help="more options for the sampling command")
    parser.add_argument("--dpo-args", default="", help="more options for the DPO command")
    parser.add_argument("--resume", action="store_true", help="continue after the rounds <out>/rounds.json records")
    args = parser.parse_args(argv)
    if args.rounds < 0:
        fail(f"--rounds={args.rounds}: give the number of rounds of sample and DPO, >= 0 (0 scores the policy alone)")
    return iterate(args.policy, args.reward, args.prompts, args.held_out, args.rounds, args.out,
                   shlex.split(args.sample_args), shlex.split(args.dpo_args), args.resume)


if __name__ == "__main__":
    sys.exit(main() and 0)
