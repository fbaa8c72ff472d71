"""``prefmodule report <log dir>``: one self-contained page with the run's curves and its samples before vs after."""

import base64
import csv
import io
import json
import re

import pytest
import yaml
from PIL import Image

from prefmodule.cli import main
from prefmodule.outputs.report import read_metrics

COLUMNS = ["train/loss", "val/loss", "train/rewards/accuracies", "val/rewards/accuracies", "train/rewards/margins",
           "val/rewards/margins", "train/rewards/chosen", "train/rewards/rejected", "train/logps/chosen",
           "train/logps/rejected", "train/lr", "train/tokens_per_sec"]


def write_run(folder, columns=COLUMNS):
    """A run folder as the CLI leaves it: metrics.csv (train rows every step, a val row at steps 4 and 9),
    samples.jsonl (two prompts before training and after 10 steps), hparams.yaml."""
    with open(folder / "metrics.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, ["epoch", "step", *columns])
        writer.writeheader()
        for step in range(10):
            writer.writerow({"epoch": 0, "step": step, **{c: 1.0 / (step + 1) for c in columns if c.startswith("train/")}})
            if step in (4, 9):
                writer.writerow({"epoch": 0, "step": step, **{c: step / 10 for c in columns if c.startswith("val/")}})
    rows = [{"step": step, "index": index, "prompt": f"prompt {index}", "completion": f"<b>{step}-{index}</b>",
             "reward": 0.5 * step, "chosen": "yes", "rejected": "no"} for step in (0, 10) for index in (3, 7)]
    (folder / "samples.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / "hparams.yaml").write_text(yaml.safe_dump({"beta": 0.1, "lr": 0.003}))


def test_report_embeds_every_curve_and_the_samples_before_and_after(tmp_path, capsys):
    write_run(tmp_path)
    path = main(["report", str(tmp_path)])
    assert path == str(tmp_path / "report.html") and capsys.readouterr().out == f"prefmodule: report -> {path}\n"
    page = open(path).read()
    images = re.findall(r"src='data:image/png;base64,([^']+)'", page)
    assert len(images) == 7  # loss, accuracy, margin, rewards, log-probs, learning rate, tokens/s
    assert all(Image.open(io.BytesIO(base64.b64decode(image))).size == (520, 340) for image in images)
    assert "not logged" not in page and "http" not in page.replace("http-equiv", "")  # nothing fetched
    assert "<tr><td>val/loss</td><td>0.9000</td></tr>" in page  # the last validation
    assert "before (step 0) vs after (step 10)" in page
    assert ("<tr><td>prompt 3</td><td>&lt;b&gt;0-3&lt;/b&gt;<div class='reward'>reward 0.000</div></td>"
            "<td>&lt;b&gt;10-3&lt;/b&gt;<div class='reward'>reward 5.000</div></td><td>yes</td><td>no</td></tr>") in page
    assert "beta: 0.1" in page


def test_report_reads_each_column_where_it_was_logged(tmp_path):
    write_run(tmp_path)
    metrics = read_metrics(str(tmp_path / "metrics.csv"))
    assert metrics["val/loss"] == [(4, 0.4), (9, 0.9)]
    assert metrics["train/lr"] == [(step, 1.0 / (step + 1)) for step in range(10)]
    assert "step" not in metrics and "epoch" not in metrics


def test_report_says_what_it_lacks(tmp_path):
    write_run(tmp_path, columns=["train/loss", "val/loss"])
    (tmp_path / "samples.jsonl").unlink()
    page = open(main(["report", str(tmp_path), "--output", str(tmp_path / "out" / "r.html")])).read()
    assert page.count("data:image/png") == 1
    assert ("not logged: Reward accuracy, Reward margin, Rewards: chosen vs rejected, Log-probs: chosen vs rejected, "
            "Learning rate, Throughput (tokens/s, all ranks)") in page
    assert "no samples.jsonl" in page
    (tmp_path / "metrics.csv").unlink()
    assert "no metrics.csv in this folder" in open(main(["report", str(tmp_path)])).read()


def test_report_of_a_missing_folder_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["report", str(tmp_path / "nope")])
    assert exit.value.code == 2 and "nope: no such folder" in capsys.readouterr().err
