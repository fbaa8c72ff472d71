"""A/B of speed and memory candidates for the decoder on a real model: the policy's forward and backward over
packed DPO batches (4 ShareGPT pairs of up to 1,024 tokens, SmolLM2-135M-Instruct), each candidate in its own
process, the same batches, interleaved repeats; median step time and peak memory.

    python scripts/decoder_candidates.py --candidates eager compile mlp_checkpoint --steps 3 --repeats 2

Candidates: ``eager`` (as prefmodule runs today); ``compile`` (``torch.compile`` of each decoder layer, regional:
one compiled code reused by the 30 identical layers, dynamic over packed lengths; compilation counts in the first
steps, reported apart); ``mlp_checkpoint`` (activation checkpointing of the MLP alone: its ``[tokens, 1536]``
activations are recomputed in backward); ``compile_mlp_checkpoint`` (both: the recomputation compiled too).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def run(candidate: str, steps: int, warmup: int) -> dict:
    import torch
    from torch.utils.checkpoint import checkpoint

    from prefmodule import DPOModule, PreferenceDataModule
    from real_assets import sharegpt_pairs, smollm2_folder

    torch.manual_seed(0)
    module = DPOModule(model=smollm2_folder())
    module.configure_model()
    data = PreferenceDataModule(train=sharegpt_pairs(64), batch_size=4, max_length=1024, tokenizer=module.tokenizer)
    data.connect(module.batch_format())
    data.setup("fit")
    batches = [batch for _, batch in zip(range(warmup + steps), data.train_dataloader())]
    layers = module.policy.model.layers
    if candidate in ("mlp_checkpoint", "compile_mlp_checkpoint"):
        for layer in layers:
            forward = layer.mlp.forward
            layer.mlp.forward = lambda x, forward=forward: checkpoint(forward, x, use_reentrant=False)
    if candidate in ("compile", "compile_mlp_checkpoint"):
        for layer in layers:
            layer.compile(dynamic=True)
    times = []
    for batch in batches:
        start = time.perf_counter()
        stats, _ = module.policy_forward(batch.sequences)
        stats.logps.sum().backward()
        module.policy.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return {"candidate": candidate, "warmup_s": times[:warmup], "steps_s": times[warmup:],
            "median_step_s": statistics.median(times[warmup:]),
            "tokens": [int(b.sequences.input_ids.numel()) for b in batches],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", nargs="+", default=["eager", "compile", "mlp_checkpoint"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(run(args.worker, args.steps, args.warmup)))
        return []
    results = []
    for repeat in range(args.repeats):
        for candidate in args.candidates:
            out = subprocess.run([sys.executable, __file__, "--worker", candidate, "--steps", str(args.steps),
                                  "--warmup", str(args.warmup)], capture_output=True, text=True, check=True,
                                 env={**os.environ, "HF_HUB_OFFLINE": "1"})
            result = json.loads(out.stdout.strip().splitlines()[-1])
            results.append(result)
            print(f"{candidate} (repeat {repeat + 1}): median step {result['median_step_s']:.2f} s, warm-up "
                  f"{', '.join(f'{t:.1f}' for t in result['warmup_s'])} s, peak {result['peak_rss_mb']:.0f} MB, "
                  f"tokens {result['tokens']}", flush=True)
    return results


if __name__ == "__main__":
    main()
