"""The sweep runner and `t5lite sweep`: plans that parse back, a tiny local sweep end to end,
resuming without retraining, fits and reports of a results CSV, and refusals of bad input."""

import argparse
import csv
import json

import numpy as np
import pytest

from t5lite.config import model_config_from_gin
from t5lite.scaling import commands, results, runner
from t5lite.train.metrics import read_metrics

# Two budgets x two sizes of d_model 64 decoders (1, 2, 4, 5 layers), 21-24 steps of 8 x 32 tokens each
# (a row per virtual device: runs use all 8).
TINY = dict(
    budgets=[1.2e10, 1.8e10],
    family="decoder",
    base_gin="runs/llama_tiny_lm.gin",
    num_sizes=3,
    span=1.03,
    tokens_per_param=0.0052,
    bindings=[
        "ModelConfig.dtype = 'float32'",
        "train.task_feature_lengths = {'targets': 32}",
        "train.batch_size = 8",
        "train.log_every = 5",
        "train.checkpoint_every = 10",
        "learning_rate_schedule.warmup_steps = 5",
        "train.eval_batches = 2",
        "train.progress = False",
    ],
)


def _parse(argv):
    parser = argparse.ArgumentParser()
    commands.add_sweep_commands(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A planned and fully run tiny sweep (module-wide: training is the slow part)."""
    sweep_dir = tmp_path_factory.mktemp("sweep")
    points = runner.write_plan(runner.SweepSpec(**TINY), sweep_dir)
    log = []
    runner.run(sweep_dir, log=log.append)
    return sweep_dir, points, log


def test_plan_gin_files_parse_back_to_the_planned_configs(tmp_path):
    points = runner.write_plan(runner.SweepSpec(**TINY), tmp_path)
    assert len({p.name for p in points}) == len(points) == 4
    assert {p.budget for p in points} == {1.2e10, 1.8e10}
    import gin

    for point in points:
        gin_file = tmp_path / point.name / runner.POINT_GIN
        assert model_config_from_gin([str(gin_file)]) == point.config
        assert gin.query_parameter("train.num_steps") == point.num_steps >= runner.MIN_STEPS
        assert gin.query_parameter("train.batch_size") == 8
        assert point.tokens_per_step == 8 * 32
        assert abs(point.flops / point.budget - 1) < 0.05  # whole steps keep C within fits' budget grouping
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert [p["name"] for p in plan["points"]] == [p.name for p in points]
    with (tmp_path / "plan.csv").open() as f:
        assert [row["name"] for row in csv.DictReader(f)] == [p.name for p in points]
    launches = (tmp_path / "commands.sh").read_text().splitlines()[3:]
    assert launches == [
        f"t5lite train --gin_file={tmp_path / p.name / 'point.gin'} --model_dir={tmp_path / p.name}" for p in points
    ]
    # The same plan again is a no-op; another one is refused before anything is overwritten.
    runner.write_plan(runner.SweepSpec(**TINY), tmp_path)
    before = (tmp_path / "plan.json").read_text()
    with pytest.raises(ValueError, match="another sweep's plan"):
        runner.write_plan(runner.SweepSpec(**{**TINY, "budgets": [1.2e10, 2.4e10]}), tmp_path)
    assert (tmp_path / "plan.json").read_text() == before
    assert not list(tmp_path.glob("*C2.40e10*"))


@pytest.mark.slow
def test_sweep_runs_end_to_end(sweep):
    sweep_dir, points, log = sweep
    rows = results.read_results(sweep_dir / "results.csv")
    assert rows.config == [p.name for p in points]
    assert np.all(np.isfinite(rows.loss)) and np.all(rows.loss > 0)
    assert rows.D.tolist() == [p.num_steps * p.tokens_per_step for p in points]
    assert rows.C.tolist() == [p.flops for p in points]
    smoothed = results.read_results(sweep_dir / "results.csv", loss_column="train_loss").loss
    assert np.all(np.isfinite(smoothed)) and np.all(smoothed < np.log(4224) + 1)
    assert log[0].startswith(f"[1/{len(points)}] {points[0].name}: training")
    assert log[-1].startswith(f"{len(points)} of {len(points)} points finished")
    for point in points:
        assert runner.is_finished(sweep_dir, point)


@pytest.mark.slow
def test_rerun_skips_finished_points(sweep):
    sweep_dir, points, _ = sweep
    watched = [f for p in points for f in (sweep_dir / p.name).rglob("*") if f.is_file()]
    stamps = {f: f.stat().st_mtime_ns for f in watched}
    log = []
    runner.run(sweep_dir, log=log.append)
    assert all(line.endswith("finished before, skipped") for line in log[:-1]) and len(log) == len(points) + 1
    assert {f: f.stat().st_mtime_ns for f in watched} == stamps


@pytest.mark.slow
def test_interrupted_point_resumes_from_its_checkpoint(sweep, tmp_path):
    sweep_dir, points, _ = sweep
    point = points[0]
    run_dir = tmp_path / point.name
    run_dir.mkdir()
    plan = json.loads((sweep_dir / "plan.json").read_text())
    (tmp_path / "plan.json").write_text(json.dumps({**plan, "points": plan["points"][:1]}))  # a one-point sweep
    (run_dir / runner.POINT_GIN).write_text((sweep_dir / point.name / runner.POINT_GIN).read_text())
    # Interrupt: train the point only to step 10 (a checkpoint) with the same gin file.
    from t5lite import cli
    from t5lite.train.loop import train

    cli.parse_gin([str(run_dir / runner.POINT_GIN)], ["train.num_steps = 10"])
    train(str(run_dir))
    assert not runner.is_finished(tmp_path, point)
    log = []
    rows = runner.run(tmp_path, log=log.append)
    assert log[0].startswith(f"[1/1] {point.name}: training")
    # A restart would have logged steps 5 and 10 again; a resumed run logs only the steps after 10.
    logged = [json.loads(line)["step"] for line in (run_dir / "train_metrics.jsonl").read_text().splitlines()]
    assert logged == [5, 10] + [s for s in range(15, point.num_steps, 5)] + [point.num_steps]
    assert runner.is_finished(tmp_path, point)
    assert [r["config"] for r in rows] == [point.name]
    assert read_metrics(run_dir / "eval_metrics.jsonl")[-1]["step"] == point.num_steps


def _synthetic_csv(path, budgets=(1e18, 1e19, 1e20), sizes=5):
    """Losses from Chinchilla's law on IsoFLOP profiles (C = 6ND), with a little noise."""
    rng = np.random.default_rng(0)
    rows = []
    for C in budgets:
        n_opt = 0.1 * (C / 6) ** 0.5
        for N in n_opt * np.logspace(-1, 1, sizes):
            D = C / (6 * N)
            loss = (1.69 + 406.4 / N**0.34 + 410.7 / D**0.28) * np.exp(rng.normal(0, 0.002))
            rows.append({"config": f"C{C:.0e}_N{N:.3g}", "N": N, "D": D, "C": C, "loss": loss})
    results.write_results(path, rows)
    return path


def test_fit_prints_the_three_approaches(tmp_path, capsys):
    csv_path = _synthetic_csv(tmp_path / "results.csv")
    args = _parse(["sweep", "fit", "--csv", str(csv_path)])
    args.run(args)
    fitted = json.loads(capsys.readouterr().out)
    assert {"approach1", "approach2", "approach3", "kaplan", "holdout_largest_budget"} <= set(fitted)
    assert fitted["approach3"]["alpha"] == pytest.approx(0.34, rel=0.15)
    assert fitted["approach3"]["beta"] == pytest.approx(0.28, rel=0.15)
    a = 0.28 / (0.34 + 0.28)
    assert fitted["approach2"]["a"] == pytest.approx(a, abs=0.06)


def test_report_writes_pngs_and_markdown(tmp_path):
    _synthetic_csv(tmp_path / "results.csv")
    args = _parse(["sweep", "report", "--sweep_dir", str(tmp_path)])
    args.run(args)
    for name in ("isoflops.png", "allocations.png", "loss_contours.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (tmp_path / "report.md").read_text()
    assert "| approach1 |" in report and "| approach2 |" in report and "| approach3 |" in report
    assert "![isoflops.png](isoflops.png)" in report
    assert report.count("| C1e+") == 15  # one row per run


def test_too_few_points_are_refused_before_writing(tmp_path):
    _synthetic_csv(tmp_path / "results.csv", budgets=(1e18,), sizes=5)
    for command in ("fit", "report"):
        args = _parse(["sweep", command, "--sweep_dir", str(tmp_path)])
        with pytest.raises(ValueError, match="at least 2 budgets with 3 sizes"):
            args.run(args)
    _synthetic_csv(tmp_path / "results.csv", sizes=2)
    with pytest.raises(ValueError, match="at least 2 budgets with 3 sizes"):
        commands.load_results(_parse(["sweep", "fit", "--csv", str(tmp_path / "results.csv")]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv"]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"family": "encoder"}, "Unknown model family 'encoder'"),
        ({"budgets": [1e9, -1.0]}, "positive FLOP counts"),
        ({"budgets": []}, "positive FLOP counts"),
        ({"base_gin": "runs/t5_tiny_span_corruption.gin"}, "trains a 'encoder_decoder' model"),
        ({"budgets": [1e9]}, "fewer than 10"),
    ],
)
def test_bad_specs_are_refused_before_writing(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        runner.write_plan(runner.SweepSpec(**{**TINY, **change}), tmp_path)
    assert not list(tmp_path.iterdir())


def test_cli_plan_reads_a_spec_file_with_overrides(tmp_path, capsys):
    args = _parse(["sweep", "plan", "--spec", "sweeps/tiny_cpu.gin", "--sweep_dir", str(tmp_path)])
    args.gin_bindings = ["SweepSpec.budgets = [1.5e10]"]
    args.run(args)
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["spec"]["budgets"] == [1.5e10] and plan["spec"]["family"] == "decoder"
    assert len(plan["points"]) == capsys.readouterr().out.count("steps,") == 3
    with pytest.raises(FileNotFoundError, match="No plan"):
        runner.run(tmp_path / "elsewhere")
