"""scripts/benchmark_data.py on a few hundred pairs: real runs of both frameworks, real numbers in the JSON."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "scripts"))
import benchmark_data  # noqa: E402

HAS_TRL = importlib.util.find_spec("trl") is not None


@pytest.mark.slow
def test_micro_run_reports_both_frameworks_and_the_same_ids(tmp_path):
    out, report = tmp_path / "bench.json", tmp_path / "BENCH.md"
    report.write_text("# Kept\n\n<!-- benchmark:data:start -->\nold\n<!-- benchmark:data:end -->\n\nAlso kept.\n")
    data = tmp_path / "pairs.jsonl"
    benchmark_data.main(["--rows", "300", "--workers", "2", "--data", str(data), "--json", str(out),
                         "--markdown", str(report)] + ([] if HAS_TRL else ["--frameworks", "prefmodule"]))
    summary = json.loads(out.read_text())
    runs = summary["runs"]
    assert data.read_text().count("\n") == 300  # the file is kept when named
    assert 80 <= summary["median_tokens"]["prompt"] <= 120 and 170 <= summary["median_tokens"]["chosen"] <= 230
    for name in ("prefmodule", "prefmodule (from its cache)") + (("trl",) if HAS_TRL else ()):
        assert runs[name]["pairs"] == 300 and runs[name]["wall_s"] > 0 and runs[name]["peak_rss_mb"] > 100
    assert runs["prefmodule (from its cache)"]["wall_s"] < runs["prefmodule"]["wall_s"]
    assert runs["prefmodule"]["cache_mb"] > 0
    if HAS_TRL:
        assert summary["same_ids_on_sample"] is True and summary["sample_size"] == 300
        assert runs["prefmodule"]["time_vs_trl"] == pytest.approx(runs["prefmodule"]["wall_s"] / runs["trl"]["wall_s"])
        assert runs["trl"]["load_s"] + runs["trl"]["prepare_s"] == pytest.approx(runs["trl"]["wall_s"])
    text = report.read_text()
    assert text.startswith("# Kept") and text.endswith("Also kept.\n") and "old" not in text
    assert "| prefmodule | " in text and "Token ids identical on 300 sampled pairs" in text
