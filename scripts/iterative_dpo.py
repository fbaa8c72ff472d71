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
                f"--trainer.default_root_dir={out}", "--model.samples=null", *QUIET, *DPO_ROUND, *extra])
    return str(Path(cli.trainer.log_dir) / "hf_model")


def iterate(policy: str, reward: str, prompts: str, held_out: str, rounds: int, out: Path, sample_args: list[str],
            dpo_args: list[str]) -> list[dict]:
    """Run the rounds; one record per policy (round 0: the start): its held-out mean reward, and the tokens
    sampled (for pairs, not for the held-out measure) before it."""
    records, sampled = [], 0
    for k in range(rounds + 1):
        held = sample(policy, reward, held_out, out / f"round{k}" / "held_out", sample_args, seed=0)
        records.append({"round": k, "policy": policy, "held_out_mean_reward": held["mean_score"],
                        "held_out_score_std": held["score_std"], "sampled_tokens": sampled})
        print(f"iterative DPO: round {k}: held-out mean reward {held['mean_score']:.3f} "
              f"(std {held['score_std']:.3f}) after {sampled} sampled tokens", flush=True)
        if k == rounds:
            break
        pairs = sample(policy, reward, prompts, out / f"round{k}" / "pairs", sample_args, seed=k + 1)
        sampled += pairs["sampled_tokens"]
        policy = train(policy, pairs["path"], out / f"round{k}" / "dpo", dpo_args)
    (out / "rounds.json").write_text(json.dumps(records, indent=2))
    return records


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", default="asset://tiny-llama", help="the starting policy (folder or hub id)")
    parser.add_argument("--reward", default="prefmodule.sampling.rules:politeness",
                        help="a reward model (folder, RewardModule .ckpt) or a function module:function")
    parser.add_argument("--prompts", default="asset://demo/train.jsonl", help="the prompts pairs are sampled for")
    parser.add_argument("--held-out", default="asset://demo/val.jsonl", help="the prompts each policy is scored on")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("runs/iterative"))
    parser.add_argument("--sample-args", default="", help="more options for the sampling command")
    parser.add_argument("--dpo-args", default="", help="more options for the DPO command")
    args = parser.parse_args(argv)
    return iterate(args.policy, args.reward, args.prompts, args.held_out, args.rounds, args.out,
                   shlex.split(args.sample_args), shlex.split(args.dpo_args))


if __name__ == "__main__":
    sys.exit(main() and 0)
