"""Data preparation side by side: prefmodule's ``PreferenceDataModule`` against TRL's ``DPOTrainer``.

One JSONL file of standard pairs (``prompt``, ``chosen``, ``rejected``; about 100 prompt tokens and 200
tokens per response with the shipped tokenizer), prepared by both on the same machine and cores:

- prefmodule: ``PreferenceDataModule(train=file, tokenize_workers=W).setup("fit")`` into an empty cache
  (read, check every row, tokenise, write the cache), then again from its cache;
- TRL: ``datasets.load_dataset("json", ...)`` then ``DPOTrainer._prepare_dataset`` with
  ``dataset_num_proc=W`` (EOS, tokenisation, the ``max_length`` filter) into an empty ``datasets`` cache.

Each run is a fresh subprocess, so its peak memory is its own (the largest resident set of the process
and, for TRL, of its worker processes). The token ids of both are compared on a sample of pairs.

    python scripts/benchmark_data.py --rows 1000000 --workers 2 --json data-benchmark.json --markdown BENCHMARKS.md
    python scripts/benchmark_data.py --rows 20000 --frameworks prefmodule      # quick

``--markdown FILE`` rewrites only the block between the ``benchmark:data`` markers of FILE (or appends it).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "scripts"))
TOKENIZER = "asset://tiny-llama"
DEMO = REPO_ROOT / "prefmodule" / "assets" / "demo" / "train.jsonl"
WORDS_PER_TOKEN = 0.62  # the tiny tokenizer on these texts: ~1.6 tokens per word
FRAMEWORKS = ("prefmodule", "trl")
SAMPLE = 2000  # pairs whose token ids are compared


def generate(path: Path, rows: int, seed: int) -> None:
    """``rows`` standard pairs of random demo words, written line by line (constant memory)."""
    words = DEMO.read_text().replace('"', " ").split()
    rng = random.Random(seed)

    def text(tokens: int) -> str:
        return " ".join(rng.choices(words, k=max(1, round(rng.gauss(tokens, tokens / 10) * WORDS_PER_TOKEN))))

    with open(path, "w") as handle:
        for _ in range(rows):
            handle.write(json.dumps({"prompt": text(100) + "?", "chosen": text(200) + ".",
                                     "rejected": text(200) + "."}) + "\n")


def sample_positions(count: int, seed: int = 0) -> list[int]:
    return sorted(random.Random(seed).sample(range(count), min(SAMPLE, count)))


# ----- the runs, each in its own process -----------------------------------------------------------------
def run_prefmodule(spec: dict) -> dict:
    import logging

    from prefmodule.data import PreferenceDataModule

    logging.disable(logging.INFO)
    start, cpu = time.perf_counter(), time.process_time()
    data = PreferenceDataModule(train=spec["data"], tokenizer=TOKENIZER, cache_dir=spec["cache_dir"],
                                max_length=spec["max_length"], tokenize_workers=spec["workers"])
    data.setup("fit")
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    children = resource.getrusage(resource.RUSAGE_CHILDREN)  # the tokenize_workers processes
    cpu += children.ru_utime + children.ru_stime
    dataset = data.datasets["train"]
    sample = [{k: dataset[i][k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
              for i in sample_positions(len(dataset))]
    return {"wall_s": seconds, "cpu_s": cpu, "pairs": len(dataset), "sample": sample}


def run_trl(spec: dict) -> dict:
    from types import SimpleNamespace

    import datasets
    from trl.trainer.dpo_trainer import DPOTrainer

    from prefmodule.models.loading import load_tokenizer

    datasets.disable_progress_bars()
    tokenizer = load_tokenizer(TOKENIZER)
    start, cpu = time.perf_counter(), time.process_time()
    dataset = datasets.load_dataset("json", data_files=spec["data"], split="train", cache_dir=spec["cache_dir"])
    loaded = time.perf_counter()
    args = SimpleNamespace(dataset_num_proc=spec["workers"], max_length=spec["max_length"],
                           truncation_mode="keep_start")
    prepared = DPOTrainer._prepare_dataset(SimpleNamespace(_tokenizer=tokenizer), dataset, tokenizer, args, "train")
    end, cpu = time.perf_counter(), time.process_time() - cpu
    children = resource.getrusage(resource.RUSAGE_CHILDREN)  # the dataset_num_proc workers
    cpu += children.ru_utime + children.ru_stime
    rows = prepared.select(sample_positions(len(prepared)))
    sample = [{k: row[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for row in rows]
    return {"wall_s": end - start, "cpu_s": cpu, "load_s": loaded - start, "prepare_s": end - loaded,
            "pairs": len(prepared),
            "sample": sample}


def worker(name: str, spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    result = {"prefmodule": run_prefmodule, "trl": run_trl}[name](spec)
    result.update(peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  children_peak_rss_mb=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
    Path(spec["out"]).write_text(json.dumps(result))


def run(name: str, spec: dict, work: Path) -> dict:
    spec_path, out = work / f"{name}.spec.json", work / f"{name}.out.json"
    out.unlink(missing_ok=True)
    spec_path.write_text(json.dumps({**spec, "out": str(out)}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    subprocess.run([sys.executable, __file__, "--worker", name, "--spec", str(spec_path)], check=True, env=env)
    return json.loads(out.read_text())


def benchmark(args: argparse.Namespace) -> dict:
    work = Path(tempfile.mkdtemp(prefix="prefmodule-data-bench-"))
    data = args.data or work / f"pairs-{args.rows}.jsonl"
    if not Path(data).exists():
        start = time.perf_counter()
        generate(Path(data), args.rows, args.seed)
        print(f"wrote {data} ({args.rows} pairs) in {time.perf_counter() - start:.0f} s", flush=True)
    spec = {"data": str(data), "workers": args.workers, "max_length": args.max_length}
    runs, load = {}, [os.getloadavg()[0]]
    try:
        if "prefmodule" in args.frameworks:
            cache = work / "prefmodule-cache"
            runs["prefmodule"] = run("prefmodule", {**spec, "cache_dir": str(cache)}, work)
            runs["prefmodule (from its cache)"] = run("prefmodule", {**spec, "cache_dir": str(cache)}, work)
            runs["prefmodule"]["cache_mb"] = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()) / 2**20
            load.append(os.getloadavg()[0])
        if "trl" in args.frameworks:
            runs["trl"] = run("trl", {**spec, "cache_dir": str(work / "hf-cache")}, work)
            load.append(os.getloadavg()[0])
    finally:
        shutil.rmtree(work / "prefmodule-cache", ignore_errors=True)
        shutil.rmtree(work / "hf-cache", ignore_errors=True)
    samples = {name: r.pop("sample") for name, r in runs.items()}
    lengths = {part: sorted(len(pair[f"{part}_ids"]) for pair in next(iter(samples.values())))
               for part in ("prompt", "chosen")} if samples else {}
    if "trl" in runs and "prefmodule" in runs:
        runs["prefmodule"]["time_vs_trl"] = runs["prefmodule"]["wall_s"] / runs["trl"]["wall_s"]
        runs["prefmodule"]["cpu_vs_trl"] = runs["prefmodule"]["cpu_s"] / runs["trl"]["cpu_s"]
        same = samples["prefmodule"] == samples["trl"]
    else:
        same = None
    shutil.rmtree(work)  # the generated file too, unless --data named it
    from benchmark import cpu_name, versions

    return {"rows": args.rows, "workers": args.workers, "max_length": args.max_length, "runs": runs,
            "median_tokens": {part: values[len(values) // 2] for part, values in lengths.items()},
            "same_ids_on_sample": same, "sample_size": min(SAMPLE, args.rows), "load_average": load,
            "machine": {"cpu": cpu_name(), "cores": os.cpu_count()}, "versions": versions()}


def markdown(summary: dict, command: str) -> str:
    runs = summary["runs"]
    lines = [f"Command: `{command}`", "",
             "| run | wall (s) | CPU (s) | peak memory (MB) | pairs | time vs TRL | CPU vs TRL |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in runs.items():
        memory = max(r["peak_rss_mb"], r["children_peak_rss_mb"])
        detail = f" (load {r['load_s']:.0f} s + prepare {r['prepare_s']:.0f} s)" if "load_s" in r else ""
        lines.append(f"| {name}{detail} | {r['wall_s']:.1f} | {r['cpu_s']:.0f} | {memory:.0f} | {r['pairs']} "
                     f"| {_ratio(r.get('time_vs_trl'))} | {_ratio(r.get('cpu_vs_trl'))} |")
    m = summary["machine"]
    lines += ["",
              f"- {summary['rows']} standard pairs (median tokens: prompt {summary['median_tokens'].get('prompt')}, "
              f"chosen {summary['median_tokens'].get('chosen')}), {summary['workers']} "
              f"workers each (prefmodule `tokenize_workers`, TRL `dataset_num_proc`), max_length "
              f"{summary['max_length']}; prefmodule's cache on disk: {runs.get('prefmodule', {}).get('cache_mb', 0):.0f} MB.",
              f"- Token ids identical on {summary['sample_size']} sampled pairs: {summary['same_ids_on_sample']}.",
              f"- Machine: {m['cpu']}, {m['cores']} cores, shared: load average "
              f"{', '.join(f'{x:.1f}' for x in summary['load_average'])} (start, after prefmodule, after TRL).",
              "- Versions: " + ", ".join(f"{k} {v}" for k, v in summary["versions"].items() if v) + "."]
    return "\n".join(lines)


def _ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}x"


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--data", help="use (or write once and keep) this JSONL file")
    parser.add_argument("--frameworks", nargs="+", choices=FRAMEWORKS, default=list(FRAMEWORKS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.spec)
        return None
    summary = benchmark(args)
    summary["command"] = ("python scripts/benchmark_data.py " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    report = markdown(summary, summary["command"])
    print(report)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    if args.markdown:
        from benchmark import write_markdown

        write_markdown(args.markdown, report, "data")
    return summary


if __name__ == "__main__":
    main()
