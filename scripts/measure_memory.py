"""Peak memory and step time of DPO (full logits, chunked log-probs padded and packed, precomputed reference) and ORPO;
of a soft-capped Gemma 2-shaped model with a 256,000-token vocabulary; and of loading a model under FSDP2.

``--suite training`` (default): a randomly initialised Llama-shaped model (vocab 32000, hidden 256, 4 layers)
trains on synthetic pre-tokenised pairs of up to 512 tokens, 8 pairs a step, float32 on CPU. Each configuration runs
in a fresh process: its peak memory is the process's max RSS over the whole run (model loading
and, for ``precomputed``, the reference pass with an empty cache included); its step time is the median wall time
between consecutive optimizer steps after a warm-up step.

``--suite gemma2``: the same with a Gemma 2-shaped model (vocab 256,000, tied, ``final_logit_softcapping`` 30):
DPO with the full logits (what such models fell back to before the soft-cap ran inside the chunked head) against
chunked log-probs.

``--suite loading``: a random Llama of about 500M parameters (float32 safetensors) set up by ``configure_model``
under FSDP2 on 2 CPU processes (``torchrun``), weights streamed per rank against loaded whole on every rank; the
peak RSS of each rank during setup, above its RSS after the imports, as a fraction of the model's float32 size.

    python scripts/measure_memory.py
    python scripts/measure_memory.py --steps 5 --repeats 2
    python scripts/measure_memory.py --suite gemma2 --batch-size 4 --max-length 256
    python scripts/measure_memory.py --suite loading
"""

from __future__ import annotations

import argparse
import json
import math
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
GEMMA2_SHAPE = dict(model_type="gemma2", vocab_size=256000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=512,
                    final_logit_softcapping=30.0, tie_word_embeddings=True)
LOADING_SHAPE = dict(vocab_size=32000, hidden_size=1280, intermediate_size=3456, num_hidden_layers=20,
                     num_attention_heads=10, num_key_value_heads=10, max_position_embeddings=512,
                     tie_word_embeddings=False)
CONFIGS = {  # name: (module class, arguments; "padding_free" goes to the collator, default: as the datamodule)
    "dpo plain": ("DPOModule", dict(logps_chunk_size=0)),
    "dpo chunked padded": ("DPOModule", dict(padding_free=False)),
    "dpo chunked": ("DPOModule", dict()),
    "dpo precomputed": ("DPOModule", dict(reference="precomputed")),
    "orpo": ("ORPOModule", dict()),
    "gemma2 dpo full logits": ("DPOModule", dict(logps_chunk_size=0)),
    "gemma2 dpo chunked": ("DPOModule", dict()),
}
SUITES = {"training": ["dpo plain", "dpo chunked padded", "dpo chunked", "dpo precomputed", "orpo"],
          "gemma2": ["gemma2 dpo full logits", "gemma2 dpo chunked"]}
RATIOS = [  # (what, numerator, denominator, measure, target)
    ("DPO peak memory, chunked / plain", "dpo chunked", "dpo plain", "peak_mib", 0.5),
    ("peak memory, DPO precomputed / ORPO", "dpo precomputed", "orpo", "peak_mib", 1.1),
    ("step time, DPO precomputed / ORPO", "dpo precomputed", "orpo", "step_s", 1.15),
    ("step time, DPO chunked / plain", "dpo chunked", "dpo plain", "step_s", None),
    ("DPO peak memory, packed / padded", "dpo chunked", "dpo chunked padded", "peak_mib", None),
    ("DPO step time, packed / padded", "dpo chunked", "dpo chunked padded", "step_s", None),
    ("Gemma 2 DPO peak memory, chunked / full logits", "gemma2 dpo chunked", "gemma2 dpo full logits", "peak_mib", None),
    ("Gemma 2 DPO step time, chunked / full logits", "gemma2 dpo chunked", "gemma2 dpo full logits", "step_s", None),
]


def make_inputs(workdir: Path, pairs: int, max_length: int, shape: dict = SHAPE) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    shape = {"model_type": "llama", **shape}
    config = AutoConfig.for_model(shape.pop("model_type"), pad_token_id=0, bos_token_id=1, eos_token_id=2, **shape)
    AutoModelForCausalLM.from_config(config).save_pretrained(workdir / "model")
    AutoTokenizer.from_pretrained(TOKENIZER).save_pretrained(workdir / "model")
    rng = random.Random(0)
    rows = []
    for index in range(pairs):
        prompt = rng.randint(max_length // 32, max_length // 4)
        tokens = lambda count: [rng.randrange(3, shape["vocab_size"]) for _ in range(count)]  # noqa: E731
        rows.append({"index": index, "prompt_ids": [1] + tokens(prompt - 1),
                     "chosen_ids": tokens(rng.randint(max_length // 8, max_length - prompt)),
                     "rejected_ids": tokens(rng.randint(max_length // 8, max_length - prompt))})
    (workdir / "pairs.json").write_text(json.dumps(rows))


def run_one(name: str, workdir: Path, batch_size: int, steps: int, chunk_size: int | None) -> dict:
    import lightning as L

    import prefmodule
    from prefmodule.data.collate import PreferenceCollator
    from prefmodule.training.fit_end import ExportModel

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
    module = getattr(prefmodule, class_name)(model=str(workdir / "model"), lr=1e-5, **kwargs)
    times = StepTimes()
    L.seed_everything(0)
    trainer = L.Trainer(max_steps=steps + 1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[times, ExportModel(enabled=False)])
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
    parser.add_argument("--suite", choices=[*SUITES, "loading"], default="training")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), help="default: the suite's")
    parser.add_argument("--run", help=argparse.SUPPRESS)  # internal: one configuration in this process
    parser.add_argument("--load", help=argparse.SUPPRESS)  # internal: one rank of the loading suite
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        print(json.dumps(run_one(args.run, Path(args.workdir), args.batch_size, args.steps, args.chunk_size)))
        return
    if args.load:
        load_one(args.load, Path(args.workdir))
        return
    if args.suite == "loading":
        measure_loading()
        return
    args.configs = args.configs or SUITES[args.suite]
    shape = GEMMA2_SHAPE if args.suite == "gemma2" else SHAPE
    with tempfile.TemporaryDirectory() as workdir:
        make_inputs(Path(workdir), args.pairs, args.max_length, shape)
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
    print(f"{shape.get('model_type', 'llama')}-shaped {shape['hidden_size']}x{shape['num_hidden_layers']}, "
          f"vocab {shape['vocab_size']}, "
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


def rss_mib() -> float:
    """The process's resident memory now (``VmRSS``), MiB."""
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) / 1024


def load_one(mode: str, workdir: Path) -> None:
    """One rank (under ``torchrun``): set up an ORPO module on the model under FSDP2, weights ``streamed`` or
    loaded ``whole``; write the rank's RSS after the imports and its peak RSS during setup."""
    import lightning as L
    from lightning.pytorch.strategies import ModelParallelStrategy

    import prefmodule
    from prefmodule.training.fit_end import ExportModel

    start = rss_mib()
    if mode == "whole":  # as before: every rank loads the whole model, then shards it
        prefmodule.PreferenceModule._streams = lambda self, strategy: False
    module = prefmodule.ORPOModule(model=str(workdir / "model"))
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=ModelParallelStrategy(data_parallel_size=2,
                                                                                    tensor_parallel_size=1),
                        max_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[ExportModel(enabled=False)])
    data = prefmodule.PreferenceDataModule(train="asset://demo/train.jsonl", batch_size=1,
                                           cache_dir=str(workdir / "cache"))
    trainer.fit(module, datamodule=module.connect(data))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # Gathered one weight at a time, after the peak was read: every rank takes part.
    checksum = sum(p.full_tensor().double().sum().item() for p in module.policy.parameters())
    result = {"rank": trainer.global_rank, "start_mib": start, "peak_mib": peak, "checksum": checksum}
    (workdir / f"{mode}_rank{trainer.global_rank}.json").write_text(json.dumps(result))


def measure_loading() -> None:
    from safetensors import safe_open

    with tempfile.TemporaryDirectory() as workdir:
        make_inputs(Path(workdir), 0, 512, LOADING_SHAPE)
        with safe_open(Path(workdir) / "model" / "model.safetensors", "pt") as handle:
            parameters = sum(math.prod(handle.get_slice(key).get_shape()) for key in handle.keys())
            checksum = sum(handle.get_tensor(key).double().sum().item() for key in handle.keys())
        float32_mib = parameters * 4 / 2**20
        print(f"Llama {parameters / 1e6:.0f}M parameters, {float32_mib:.0f} MiB in float32; FSDP2 on 2 CPU processes, "
              f"torch {torch.__version__}")
        print("| weights | rank | RSS after imports (MiB) | peak RSS during setup (MiB) | peak above imports "
              "(MiB) | above imports / float32 size |\n|---|---|---|---|---|---|")
        for mode in ("whole", "streamed"):
            # glibc keeps freed blocks below its (self-raising) mmap threshold for reuse, and RSS counts them:
            # a fixed threshold returns the gathered layers' memory to the system once freed, as on a GPU.
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            __file__, "--load", mode, "--workdir", workdir], check=True, capture_output=True,
                           env={**os.environ, "HF_HUB_OFFLINE": "1", "MALLOC_MMAP_THRESHOLD_": "65536"})
            for rank in (0, 1):
                r = json.loads((Path(workdir) / f"{mode}_rank{rank}.json").read_text())
                assert math.isclose(r["checksum"], checksum, rel_tol=1e-9), f"{mode}: the weights differ from the files"
                above = r["peak_mib"] - r["start_mib"]
                print(f"| {mode} | {rank} | {r['start_mib']:.0f} | {r['peak_mib']:.0f} | {above:.0f} | "
                      f"{above / float32_mib:.2f} |")


if __name__ == "__main__":
    main()
