"""Held-out accuracy of a model on an arithmetic file: greedy completions (KV-cached, up to ``--max-new-tokens``),
scored by ``prefmodule.sampling.rules:exact_match`` (the completion's last number against the row's ``answer``).

    python scripts/arithmetic_accuracy.py ~/.cache/prefmodule/models/SmolLM2-135M-Instruct
    python scripts/arithmetic_accuracy.py runs/grpo_smollm2_arithmetic/lightning_logs/version_0/hf_model
"""

from __future__ import annotations

import argparse
import json
import time

from transformers import AutoModelForCausalLM, AutoTokenizer

from prefmodule.models.generation import generate
from prefmodule.paths import resolve
from prefmodule.sampling.rules import exact_match


def accuracy(model_folder: str, data: str, max_new_tokens: int = 48, batch_size: int = 10) -> dict:
    """The share of ``data``'s problems whose greedy completion ends with the right number, with the completions."""
    rows = [json.loads(line) for line in open(resolve(data), encoding="utf-8") if line.strip()]
    tokenizer = AutoTokenizer.from_pretrained(resolve(model_folder))
    model = AutoModelForCausalLM.from_pretrained(resolve(model_folder)).eval()
    prompts = [tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"] for row in rows]
    start = time.perf_counter()
    completions = []
    for i in range(0, len(prompts), batch_size):
        completions += generate(model, tokenizer, prompts[i:i + batch_size], max_new_tokens)
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in completions]
    right = exact_match([row["prompt"] for row in rows], texts, answer=[row["answer"] for row in rows])
    return {"accuracy": sum(right) / len(rows), "problems": len(rows), "seconds": time.perf_counter() - start,
            "mean_tokens": sum(map(len, completions)) / len(rows), "completions": texts}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a model folder (a fit's hf_model, or the starting model)")
    parser.add_argument("--data", default="asset://arithmetic/val_one_digit.jsonl")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args(argv)
    result = accuracy(args.model, args.data, args.max_new_tokens)
    print(f"{args.model}: {result['accuracy']:.3f} of {result['problems']} held-out problems right (greedy, "
          f"{result['mean_tokens']:.1f} tokens per answer, {result['seconds']:.0f} s)")
    for text in result["completions"][:3]:
        print("  e.g.", repr(text[:120]))
    return result


if __name__ == "__main__":
    main()
