"""Metrics files that survive crashes: a row cut short is dropped, rows past a resumed step go."""

import json

import pytest

from t5lite.train.metrics import MetricsWriter, read_metrics


def rows(*steps):
    return "".join(json.dumps({"step": step, "loss": float(step)}) + "\n" for step in steps)


def test_a_row_cut_short_is_ignored_when_read_and_dropped_on_resume(tmp_path):
    path = tmp_path / "train_metrics.jsonl"
    path.write_text(rows(1, 2, 3, 4) + '{"step": 5, "lo')  # the disk filled up mid-row
    assert [row["step"] for row in read_metrics(path)] == [1, 2, 3, 4]
    writer = MetricsWriter(tmp_path, "train", after_step=3)  # resumed from the checkpoint of step 3
    assert path.read_text() == rows(1, 2, 3)
    writer.write(4, {"loss": 0.5})
    writer.sync()
    assert [(row["step"], row["loss"]) for row in read_metrics(path)] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 0.5)]


def test_a_corrupt_row_before_the_last_is_an_error_naming_its_line(tmp_path):
    path = tmp_path / "train_metrics.jsonl"
    path.write_text(rows(1) + "not json\n" + rows(3))
    with pytest.raises(ValueError, match=r"train_metrics.jsonl:2 is not a JSON row"):
        read_metrics(path)
