"""Write a small arithmetic task with answers: seeded JSONL prompt files for GRPO/RLOO with verifiable rewards.

Each row is a two-digit addition or subtraction (operands 10-99; a subtraction never goes below zero) and its
answer, scored by ``prefmodule.sampling.rules:exact_match`` (the completion's last number against ``answer``) and
``prefmodule.sampling.rules:answer_format`` (the completion ends with "The answer is N."):

    {"prompt": [{"role": "user", "content": "What is 23 + 58? End your reply with \\"The answer is N.\\""}],
     "answer": "81"}

Chat messages by default, so a chat model's template applies (SmolLM2-135M-Instruct gets some of these right);
``--text`` writes plain-text prompts ("Question: What is 23 + 58? ...\\nAnswer:") instead. The train and held-out
files share no problem (``a + b`` and ``b + a`` count as one). Seeded: the same arguments write the same bytes.

    python scripts/arithmetic_task.py --out data/arithmetic --train 2000 --val 200
    python scripts/arithmetic_task.py --out data/arithmetic_text --text

The package ships 200 + 50 rows of each kind (``scripts/build_assets.py``): ``asset://arithmetic/train.jsonl``,
``asset://arithmetic/val.jsonl`` (messages) and ``asset://arithmetic/train_text.jsonl``,
``asset://arithmetic/val_text.jsonl`` (text).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SEED = 0
OPERANDS = {1: (1, 9), 2: (10, 99)}  # digits -> the smallest and largest operand
LOW, HIGH = OPERANDS[2]
INSTRUCTION = 'End your reply with "The answer is N." where N is the number.'
QUESTIONS = ("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "Calculate {a} {op} {b}.",
             "What does {a} {op} {b} equal?")


def problems(n_train: int, n_val: int, seed: int = SEED, low: int = LOW, high: int = HIGH) -> tuple[list, list]:
    """``(train, val)``: lists of ``(a, op, b)`` drawn without replacement, no problem in both (``a + b`` is
    ``b + a``). Each split half additions, half subtractions with ``a >= b`` (one more addition when odd), in a
    seeded order."""
    rng = random.Random(seed)
    additions = [(a, "+", b) for a in range(low, high + 1) for b in range(a, high + 1)]  # one order per pair
    subtractions = [(a, "-", b) for a in range(low, high + 1) for b in range(low, a + 1)]
    rng.shuffle(additions)
    rng.shuffle(subtractions)
    if max((n_train + 1) // 2 + (n_val + 1) // 2, n_train // 2 + n_val // 2) > len(additions):
        raise SystemExit(f"{n_train} + {n_val} problems asked for; operands {low}-{high} give "
                         f"{len(additions) + len(subtractions)}")
    splits = []
    for n, start_add, start_sub in ((n_train, 0, 0), (n_val, (n_train + 1) // 2, n_train // 2)):
        split = additions[start_add:start_add + (n + 1) // 2] + subtractions[start_sub:start_sub + n // 2]
        rng.shuffle(split)
        # an addition appears in one order only (so no split shares one): half of them written b + a
        splits.append([(b, op, a) if op == "+" and rng.random() < 0.5 else (a, op, b) for a, op, b in split])
    return splits[0], splits[1]


def answer(problem: tuple[int, str, int]) -> int:
    a, op, b = problem
    return a + b if op == "+" else a - b


def row(problem: tuple[int, str, int], rng: random.Random, text: bool = False, instruction: bool = True) -> dict:
    """One JSONL row: ``{"prompt": messages or text, "answer": "<number>"}``; the question alone without
    ``instruction``."""
    a, op, b = problem
    question = rng.choice(QUESTIONS).format(a=a, op=op, b=b)
    if instruction:
        question = f"{question} {INSTRUCTION}"
    if text:
        prompt: str | list = f"Question: {question}\nAnswer:"
    else:
        prompt = [{"role": "user", "content": question}]
    return {"prompt": prompt, "answer": str(answer(problem))}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def write_task(out: Path, n_train: int = 200, n_val: int = 50, seed: int = SEED, text: bool = False,
               suffix: str = "", digits: int = 2, instruction: bool = True) -> dict[str, Path]:
    """Write ``out/train{suffix}.jsonl`` and ``out/val{suffix}.jsonl``; returns their paths by split."""
    train, val = problems(n_train, n_val, seed, *OPERANDS[digits])
    rng = random.Random(seed + 1)
    paths = {}
    for split, chosen in (("train", train), ("val", val)):
        paths[split] = out / f"{split}{suffix}.jsonl"
        write_jsonl(paths[split], [row(problem, rng, text, instruction) for problem in chosen])
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for train.jsonl and val.jsonl")
    parser.add_argument("--train", type=int, default=200, help="training rows (default 200)")
    parser.add_argument("--val", type=int, default=50, help="held-out rows (default 50)")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--text", action="store_true", help="plain-text prompts instead of chat messages")
    parser.add_argument("--digits", type=int, choices=sorted(OPERANDS), default=2,
                        help="operands of one digit (1-9: 90 problems in all) or two (10-99, default)")
    parser.add_argument("--no-instruction", dest="instruction", action="store_false",
                        help='ask the question alone, without \'End your reply with "The answer is N."\'')
    args = parser.parse_args(argv)
    if args.train < 0 or args.val < 0:
        parser.error("--train and --val must be >= 0")
    paths = write_task(args.out, args.train, args.val, args.seed, args.text, digits=args.digits,
                       instruction=args.instruction)
    print(f"Wrote {args.train} training rows to {paths['train']} and {args.val} held-out rows to {paths['val']}")


if __name__ == "__main__":
    main()
