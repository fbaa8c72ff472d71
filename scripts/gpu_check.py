"""Everything one lent GPU can show in one run (about 6 minutes on an H100/H200), as JSON and a table.

    python scripts/gpu_check.py runs/gpu_check              # on a machine with a CUDA GPU
    python scripts/gpu_check.py runs/gpu_check --dry-run    # its CPU-able parts on a micro model (CI)

The checks, each in its own process with its own time limit, so that one failing leaves the others:

1. ``pytest -m gpu``: the tests that need CUDA (bf16 DDP, FSDP1 and FSDP2 on one GPU, DPO and ORPO).
2. DPO and ORPO in bf16 on a Qwen2-0.5B-shaped random model (tied embeddings, vocab 151,936) with pairs of
   up to 2,048 tokens, packed and padded, and TRL on the same pairs in the same run (``scripts/benchmark.py``):
   median step time, tokens/s, MFU (model FLOPs over the bf16 matmul throughput measured in the run) and peak
   memory (``torch.cuda.max_memory_allocated``).
3. FSDP2 (``configs/strategies/fsdp2.yaml``) on one GPU: DPO through the CLI on the same model shape, its step
   time and peak memory.

Each check writes ``<folder>/<check>.json``; ``<folder>/gpu_check.json`` gathers them, and the table is printed.
``--dry-run`` runs 2 (DPO, packed) and 3 on the CPU in float32 with a micro model and prefmodule alone (TRL's
side of the benchmark and padded batches have their own tests), and skips 1.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
QWEN2_05B = ["--preset", "qwen2-0.5b", "--max-length", "2048", "--batch-size", "8", "--steps", "5", "--warmup-steps", "2"]
MICRO = ["--vocab-size", "256", "--hidden-size", "32", "--intermediate-size", "64", "--layers", "1", "--heads", "2",
         "--kv-heads", "2", "--max-length", "48", "--batch-size", "2", "--steps", "2", "--warmup-steps", "1"]
LIMITS_S = {"pytest_gpu": 150, "benchmark_packed": 150, "benchmark_padded": 90, "fsdp2": 90}


class StepClock(L.Callback):
    """In the FSDP2 run: the wall time of each optimizer step and the peak memory, written to ``$GPU_CHECK_OUT``."""

    def __init__(self):
        self.ends: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module) -> None:
        steps = [b - a for a, b in zip(self.ends, self.ends[1:])]
        peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
        Path(os.environ["GPU_CHECK_OUT"]).write_text(json.dumps({
            "step_times_s": steps, "median_step_s": sorted(steps)[len(steps) // 2] if steps else None,
            "peak_memory_mb": peak, "global_step": trainer.global_step}))


def run(name: str, command: list[str], folder: Path, dry_run: bool, env: dict | None = None) -> dict:
    """Run one check in its own process; its result: status, seconds, and the tail of its output if it failed."""
    start = time.perf_counter()
    limit = LIMITS_S[name] * (4 if dry_run else 1)  # a shared CI machine is slower than a GPU host's CPU
    try:
        done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=limit,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
        status = "passed" if done.returncode == 0 else "failed"
        output = done.stdout + done.stderr
    except subprocess.TimeoutExpired as expired:
        status, output = f"timed out after {limit} s", f"{expired.stdout or ''}{expired.stderr or ''}"
    result = {"check": name, "status": status, "seconds": round(time.perf_counter() - start, 1)}
    if status != "passed":
        result["output_tail"] = output[-3000:] if isinstance(output, str) else str(output)[-3000:]
    (folder / f"{name}.json").write_text(json.dumps(result, indent=2))
    return result


def benchmark_command(folder: Path, padding: str, dry_run: bool) -> list[str]:
    shape = MICRO if dry_run else [*QWEN2_05B, "--device", "cuda", "--dtype", "bf16"]
    frameworks = ["prefmodule"] if dry_run or padding == "off" else ["prefmodule", "trl"]
    objectives = ["dpo"] if dry_run else ["dpo", "orpo"]
    return [sys.executable, "scripts/benchmark.py", *shape, "--objectives", *objectives, "--frameworks",
            *frameworks, "--padding-free", padding, "--json", str(folder / f"benchmark_{padding}.json")]


def fsdp2_command(folder: Path, dry_run: bool) -> list[str]:
    """DPO through the CLI with FSDP2 on one device, on the benchmark's model (saved by the packed benchmark run)."""
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    import benchmark

    settings, _ = benchmark.parse_args([*MICRO, "--vocab-size", "1024"] if dry_run else QWEN2_05B)  # the demo's ids
    model = folder / "fsdp2_model"
    benchmark.build_model(settings, model)
    device = ["--trainer.accelerator=cpu", "--trainer.precision=32-true"] if dry_run else [
        "--trainer.accelerator=cuda", "--trainer.precision=bf16-mixed"]
    return [sys.executable, "-m", "prefmodule", "fit", "--config", "configs/dpo.yaml", "--config",
            "configs/strategies/fsdp2.yaml", "--trainer.strategy.data_parallel_size=1", "--trainer.devices=1", *device,
            f"--model.model={model}", f"--trainer.default_root_dir={folder / 'fsdp2_run'}", "--export.enabled=false",
            "--samples.num_prompts=0", f"--trainer.max_steps={2 if dry_run else 12}", "--trainer.limit_val_batches=0",
            "--data.batch_size=8", "--trainer.enable_progress_bar=false", "--trainer.callbacks+=gpu_check.StepClock"]


def rows(folder: Path, results: list[dict]) -> list[dict]:
    """One row per measured run: check, objective, framework, layout, step time, tokens/s, MFU, peak memory."""
    table = []
    for padding in ("on", "off"):
        path = folder / f"benchmark_{padding}.json"
        if path.exists():
            for r in json.loads(path.read_text())["runs"]:
                layout = "packed" if r.get("packed") else "padded"
                table.append({"check": "benchmark", "objective": r["objective"], "framework": r["framework"],
                              "layout": layout, "step_ms": r["median_step_s"] * 1e3, "tokens_per_s": r["tokens_per_s"],
                              "mfu": r["mfu"], "peak_memory_mb": r["peak_memory_mb"]})
    fsdp2 = folder / "fsdp2_steps.json"
    if fsdp2.exists():
        r = json.loads(fsdp2.read_text())
        table.append({"check": "fsdp2", "objective": "dpo", "framework": "prefmodule", "layout": "packed",
                      "step_ms": (r["median_step_s"] or 0) * 1e3, "tokens_per_s": None, "mfu": None,
                      "peak_memory_mb": r["peak_memory_mb"]})
    return table


def print_table(results: list[dict], table: list[dict]) -> None:
    print("| check | status | seconds |\n|---|---|---:|")
    for r in results:
        print(f"| {r['check']} | {r['status']} | {r['seconds']} |")
    print("\n| check | objective | framework | batches | step (ms) | tokens/s | MFU | peak memory (MB) |")
    print("|---|---|---|---|---:|---:|---:|---:|")
    for r in table:
        cells = [f"{r['step_ms']:.0f}", f"{r['tokens_per_s']:.0f}" if r["tokens_per_s"] else "",
                 f"{r['mfu']:.3f}" if r["mfu"] else "", f"{r['peak_memory_mb']:.0f}" if r["peak_memory_mb"] else ""]
        print(f"| {r['check']} | {r['objective']} | {r['framework']} | {r['layout']} | " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="where the JSON files go")
    parser.add_argument("--dry-run", action="store_true", help="the CPU-able parts on a micro model, no GPU")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU, or pass --dry-run")
    folder = args.folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    tests = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests"]
    results = [
        {"check": "pytest_gpu", "status": "skipped (dry run)", "seconds": 0} if args.dry_run else
        run("pytest_gpu", tests, folder, args.dry_run),
        run("benchmark_packed", benchmark_command(folder, "on", args.dry_run), folder, args.dry_run),
        *([] if args.dry_run else [run("benchmark_padded", benchmark_command(folder, "off", False), folder, False)]),
        run("fsdp2", fsdp2_command(folder, args.dry_run), folder, args.dry_run,
            env={"GPU_CHECK_OUT": str(folder / "fsdp2_steps.json"), "PYTHONPATH": os.pathsep.join(
                [str(REPO_ROOT / "scripts"), os.environ.get("PYTHONPATH", "")])}),
    ]
    table = rows(folder, results)
    summary = {"dry_run": args.dry_run, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "torch": torch.__version__, "checks": results, "runs": table}
    (folder / "gpu_check.json").write_text(json.dumps(summary, indent=2))
    print_table(results, table)
    return summary


if __name__ == "__main__":
    main()
