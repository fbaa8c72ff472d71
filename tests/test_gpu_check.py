"""scripts/gpu_check.py --dry-run: the GPU check's CPU-able parts on a micro model, as CI runs them."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "scripts"))
import gpu_check  # noqa: E402


def test_dry_run_runs_every_check_and_writes_json_and_a_table(tmp_path, capsys):
    summary = gpu_check.main([str(tmp_path), "--dry-run"])
    assert [(c["check"], c["status"]) for c in summary["checks"]] == [
        ("pytest_gpu", "skipped (dry run)"), ("benchmark_packed", "passed"), ("fsdp2", "passed")]
    runs = {(r["check"], r["objective"], r["layout"]): r for r in summary["runs"]}
    assert runs.keys() == {("benchmark", "dpo", "packed"), ("fsdp2", "dpo", "packed")}
    for run in runs.values():
        assert run["step_ms"] > 0 and run["framework"] == "prefmodule"
    for key in [k for k in runs if k[0] == "benchmark"]:
        assert runs[key]["tokens_per_s"] > 0 and 0 < runs[key]["mfu"] < 1
    assert json.loads((tmp_path / "gpu_check.json").read_text()) == summary
    assert json.loads((tmp_path / "fsdp2_steps.json").read_text())["global_step"] == 2
    table = capsys.readouterr().out
    assert "| fsdp2 | passed |" in table and "| benchmark | dpo | prefmodule | packed |" in table
