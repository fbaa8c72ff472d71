"""Peak memory and step time of DPO (full logits, chunked log-probs padded and packed, precomputed reference) and ORPO.

A randomly initialised Llama-shaped model (vocab 32000, hidden 256, 4 layers) trains on synthetic
pre-tokenised pairs of up to 512 tokens, 8 pairs a step, float32 on CPU. Each configuration runs
in a fresh process: its peak memory is the process's max RSS over the whole run (model loading
and, for ``precomputed``, the reference pass with an empty cache included); its step time is the median wall time
between consecutive optimizer steps after a warm-up step.

    python scripts/measure_memory.py
    python scripts/measure_memory.py --steps 5 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

TOKENIZER = Path(__file__).resolve().parent.parent / "prefmodule" / "assets" / "tiny-llama"
SHAPE = dict(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=False)
CONFIGS = {  # name: (module class, arguments; "padding_free" goes to the collator, default: as the datamodule)
    "dpo plain": ("DPOModule", dict(logps_chunk_size=0)),
    "dpo chunked padded": ("DPOModule", dict(padding_free=False)),
    "dpo chunked": ("DPOModule", dict()),
    "dpo precomputed": ("DPOModule", dict(reference="precomputed")),
    "orpo": ("ORPOModule", dict()),
}
RATIOS = [  # (what, numerator, denominator, measure, target)
    ("DPO peak memory, chunked / plain", "dpo chunked", "dpo plain", "peak_mib", 0.5),
    ("peak memory, DPO precomputed / ORPO", "dpo precomputed", "orpo", "peak_mib", 1.1),
    ("step time, DPO precomputed / ORPO", "dpo precomputed", "orpo", "step_s", 1.15),
    ("step time, DPO chunked / plain", "dpo chunked", "dpo plain", "step_s", None),
    ("DPO peak memory, packed / padded", "dpo chunked", "dpo chunked padded", "peak_mib", None),
    ("DPO step time, packed / padded", "dpo chunked", "dpo chunked padded", "step_s", None),
]


def make_inputs(workdir: Path, pairs: int, max_length: int) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SHAPE)).save_pretrained(workdir / "model")
    AutoTokenizer.from_pretrained(TOKENIZER).save_pretrained(workdir / "model")
    rng = random.Random(0)
    rows = []
    for index in range(pairs):
        prompt = rng.randint(max_length // 32, max_length // 4)
        tokens = lambda count: [rng.randrange(3, SHAPE["vocab_size"]) for _ in range(count)]  # noqa: E731
        rows.append({"index": index, "prompt_ids": [1] + tokens(prompt - 1),
                     "chosen_ids": tokens(rng.randint(max_length // 8, max_length - prompt)),
                     "rejected_ids": tokens(rng.randint(max_length // 8, max_length - prompt))})
    (workdir / "pairs.json").write_text(json.dumps(rows))


def run_one(name: str, workdir: Path, batch_size: int, steps: int, chunk_size: int | None) -> dict:
    import lightning as L

    import prefmodule
    from prefmodule.data.collate import PreferenceCollator

    pairs = json.loads((workdir / "pairs.json").read_text())

    class_name, kwargs = CONFIGS[name]
    kwargs = dict(kwargs)
    padding_free = kwargs.pop("padding_free", None)

    class Pairs(L.LightningDataModule):  # pre-tokenised pairs through prefmodule's collator
        def train_dataloader(self):  # packed unless told otherwise, as PreferenceDataModule(padding_free=None)
            packs = padding_free if padding_free is not None else self.trainer.lightning_module.packed_attention
            return torch.utils.data.DataLoader(pairs, batch_size=batch_size, shuffle=True,
                                               collate_fn=PreferenceCollator(pad_token_id=0, padding_free=packs))

    class StepTimes(L.Callback):
        def __init__(self):
            self.ends = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.ends.append(time.perf_counter())

    if class_name == "DPOModule":  # an empty cache: ``precomputed`` pays its reference pass
        kwargs = {"ref_cache_dir": tempfile.mkdtemp(dir=workdir), **kwargs}
    if chunk_size is not None:
        kwargs = {"logps_chunk_size": chunk_size, **kwargs}
    module = getattr(prefmodule, class_name)(model=str(workdir / "model"), lr=1e-5, export_hf=False, **kwargs)
    times = StepTimes()
    L.seed_everything(0)
    trainer = L.Trainer(max_steps=steps + 1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[times])
    trainer.fit(module, datamodule=Pairs())
    return {"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "step_s": statistics.median(b - a for a, b in zip(times.ends, times.ends[1:]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run, after one warm-up step")
    parser.add_argument("--repeats", type=int, default=1, help="runs per configuration, interleaved; medians reported")
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per step")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--chunk-size", type=int, help="logps_chunk_size of the chunked runs (default: the module's)")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--run", help=argparse.SUPPRESS)  # internal: one configuration in this process
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        print(json.dumps(run_one(args.run, Path(args.workdir), args.batch_size, args.steps, args.chunk_size)))
        return
    with tempfile.TemporaryDirectory() as workdir:
        make_inputs(Path(workdir), args.pairs, args.max_length)
        runs = {name: [] for name in args.configs}
        for _ in range(args.repeats):
            for name in args.configs:
                command = [sys.executable, __file__, "--run", name, "--workdir", workdir, "--steps", str(args.steps),
                           "--batch-size", str(args.batch_size)]
                command += ["--chunk-size", str(args.chunk_size)] if args.chunk_size is not None else []
                output = subprocess.run(command, check=True, capture_output=True, text=True,
                                        env={**os.environ, "HF_HUB_OFFLINE": "1"}).stdout
                runs[name].append(json.loads(output.strip().splitlines()[-1]))
    result = {name: {key: statistics.median(r[key] for r in values) for key in values[0]}
              for name, values in runs.items()}
    print(f"Llama-shaped {SHAPE['hidden_size']}x{SHAPE['num_hidden_layers']}, vocab {SHAPE['vocab_size']}, "
          f"{args.batch_size} pairs/step, up to {args.max_length} tokens, fp32 CPU, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.steps} timed steps x {args.repeats} runs, "
          f"load average {os.getloadavg()[0]:.1f}")
    print("| configuration | peak RSS (MiB) | step time (s) |\n|---|---|---|")
    for name, values in result.items():
        print(f"| {name} | {values['peak_mib']:.0f} | {values['step_s']:.2f} |")
    for what, numerator, denominator, measure, target in RATIOS:
        if numerator in result and denominator in result:
            ratio = result[numerator][measure] / result[denominator][measure]
            verdict = "" if target is None else f" (target <= {target}: {'met' if ratio <= target else 'MISSED'})"
            print(f"{what}: {ratio:.2f}{verdict}")


if __name__ == "__main__":
    main()
