"""Runs an IsoFLOP sweep: one gin file per plan point, trained here one after another or launched by a scheduler.

A sweep dir holds one plan:
  plan.json, plan.csv   the spec and its points (a dir holding another sweep's plan is refused)
  commands.sh           one `t5lite train` launch per point, for a cluster scheduler
  <point>/point.gin     the point's run: the base run gin, the spec's bindings, the whole
                        ModelConfig, train.num_steps and one evaluation at the end. Not
                        `config.gin`: the point dir is also the run's model dir, where the
                        train loop writes its own expanded config.gin.
  <point>/...           the model dir (checkpoints/, train_metrics.jsonl, eval_metrics.jsonl)
  results.csv           one row per finished point, refreshed after each point

The base run gin (e.g. runs/llama_tiny_lm.gin) decides everything but the model's shape: the
task, batch size, sequence lengths, optimizer and the ModelConfig fields the family's shape rule
leaves alone (vocabulary, dtype, ...). A point trains round(planned tokens / tokens per step)
steps, so its real D and C differ from the plan by the rounding; results.csv records the real ones.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import pathlib
import shlex
from collections.abc import Callable

import gin
import numpy as np

import t5lite.data  # noqa: F401  (registers the tasks a base run names)
from t5lite import config as config_lib
from t5lite.config import ModelConfig
from t5lite.models import flops
from t5lite.models.params import param_count
from t5lite.scaling import planner, results
from t5lite.train import loop
from t5lite.train.metrics import read_metrics
from t5lite.train.spec import RunSpec

# Rounding to whole steps moves C by at most 1/(2·MIN_STEPS), inside the 5% fits group budgets by.
MIN_STEPS = 10
# The smoothed train loss averages the logged losses over this final fraction of training.
SMOOTHING_FRACTION = 0.1
POINT_GIN = "point.gin"


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    """What a sweep is: budgets (training FLOPs), a planner family, and the run every point starts from.

    `bindings` are gin lines applied on top of `base_gin` for every point (e.g. a float32 dtype,
    a shorter length); `num_sizes`, `span` and `tokens_per_param` go to `planner.plan`.
    """

    budgets: tuple[float, ...]
    family: str
    base_gin: str
    num_sizes: int = 3
    span: float = 4.0
    tokens_per_param: float = 20.0
    bindings: tuple[str, ...] = ()

    def __post_init__(self):
        budgets = tuple(float(b) for b in np.atleast_1d(self.budgets))
        if not budgets or not all(b > 0 for b in budgets):
            raise ValueError(
                f"SweepSpec.budgets must be a non-empty list of positive FLOP counts; got {list(budgets)}."
            )
        planner.family_base(self.family)  # an unknown family fails here
        object.__setattr__(self, "budgets", budgets)
        object.__setattr__(self, "bindings", tuple(self.bindings))
        object.__setattr__(self, "base_gin", _resolve_gin(self.base_gin))


GinSweepSpec = gin.external_configurable(SweepSpec, name="SweepSpec", module="t5lite")


@dataclasses.dataclass(frozen=True)
class Point:
    """One planned run: its shape and how many steps of the base run's batches the budget buys."""

    name: str
    budget: float
    config: ModelConfig
    num_steps: int
    tokens_per_step: int
    flops_per_step: int

    @property
    def tokens(self) -> int:
        return self.num_steps * self.tokens_per_step

    @property
    def flops(self) -> int:
        return self.num_steps * self.flops_per_step

    def to_json(self) -> dict:
        return {
            **{f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "config"},
            "config": json.loads(self.config.to_json()),
        }

    @classmethod
    def from_json(cls, record: dict) -> Point:
        return cls(**{**record, "config": ModelConfig.from_json(json.dumps(record["config"]))})


def load_spec(gin_file: str, bindings=()) -> SweepSpec:
    """The SweepSpec a gin file (plus `--gin.` bindings) describes; see gin_configs/sweeps/."""
    config_lib.parse_gin([gin_file], bindings)
    try:
        return GinSweepSpec()
    except TypeError as error:
        raise ValueError(
            f"{gin_file} must bind SweepSpec.budgets, SweepSpec.family and SweepSpec.base_gin ({error})."
        ) from error


def make_plan(spec: SweepSpec) -> list[Point]:
    """The spec's IsoFLOP grid with step counts from the base run's batch; validates everything, writes nothing."""
    config_lib.parse_gin([spec.base_gin], spec.bindings)
    base = config_lib.GinModelConfig()
    family_architecture = planner.family_base(spec.family).architecture
    if base.architecture != family_architecture:
        raise ValueError(
            f"{spec.base_gin} trains a {base.architecture!r} model but family {spec.family!r} is "
            f"{family_architecture!r}; pick a base run of that architecture."
        )
    base_run = RunSpec.from_gin()
    batch_size = base_run.batch_size
    encoder_length, decoder_length = base_run.lengths
    overrides = {f.name: getattr(base, f.name) for f in dataclasses.fields(ModelConfig)}
    points = []
    for p in planner.plan(
        spec.budgets,
        spec.family,
        inputs_length=encoder_length,
        targets_length=decoder_length,
        num_sizes=spec.num_sizes,
        span=spec.span,
        tokens_per_param=spec.tokens_per_param,
        overrides=overrides,
    ):
        tokens_per_step = batch_size * flops.tokens_per_sequence(p.config, encoder_length, decoder_length)
        num_steps = round(p.tokens / tokens_per_step)
        if num_steps < MIN_STEPS:
            raise ValueError(
                f"{p.name} gets {num_steps} steps of {tokens_per_step} tokens (fewer than {MIN_STEPS}); "
                "raise the budgets or lower train.batch_size."
            )
        flops_per_step = batch_size * flops.training_flops_per_sequence(p.config, encoder_length, decoder_length)
        points.append(Point(p.name, p.flops, p.config, num_steps, tokens_per_step, flops_per_step))
    return points


def write_plan(spec: SweepSpec, sweep_dir: str | pathlib.Path) -> list[Point]:
    """Writes plan.json, plan.csv, commands.sh and each point's gin file; rewriting the same plan is a no-op."""
    sweep_dir = pathlib.Path(sweep_dir).absolute()
    points = make_plan(spec)
    record = json.loads(json.dumps({"spec": dataclasses.asdict(spec), "points": [p.to_json() for p in points]}))
    plan_file = sweep_dir / "plan.json"
    if plan_file.is_file() and json.loads(plan_file.read_text()) != record:
        raise ValueError(
            f"{sweep_dir} holds another sweep's plan ({plan_file}); use a new sweep dir, or the spec recorded there."
        )
    for point in points:
        (sweep_dir / point.name).mkdir(parents=True, exist_ok=True)
        (sweep_dir / point.name / POINT_GIN).write_text(_point_gin(spec, point))
    plan_file.write_text(json.dumps(record, indent=1))
    _write_plan_csv(sweep_dir / "plan.csv", points)
    lines = [
        f"t5lite train --gin_file={shlex.quote(str(sweep_dir / p.name / POINT_GIN))} "
        f"--model_dir={shlex.quote(str(sweep_dir / p.name))}"
        for p in points
    ]
    (sweep_dir / "commands.sh").write_text(
        "#!/bin/sh\n# One launch per IsoFLOP point; each resumes from its checkpoint when rerun.\n"
        "# Submit the lines to a scheduler, or run them all here with `t5lite sweep run`.\n" + "\n".join(lines) + "\n"
    )
    return points


def read_plan(sweep_dir: str | pathlib.Path) -> list[Point]:
    plan_file = pathlib.Path(sweep_dir) / "plan.json"
    if not plan_file.is_file():
        raise FileNotFoundError(
            f"No plan at {plan_file}; write one with `t5lite sweep plan --spec=... --sweep_dir={sweep_dir}` first."
        )
    return [Point.from_json(p) for p in json.loads(plan_file.read_text())["points"]]


def is_finished(sweep_dir: str | pathlib.Path, point: Point) -> bool:
    """Its final checkpoint and final evaluation exist (Orbax shows a step dir only once the save completed)."""
    run_dir = pathlib.Path(sweep_dir) / point.name
    evals = run_dir / "eval_metrics.jsonl"
    return (
        (run_dir / "checkpoints" / str(point.num_steps)).is_dir()
        and evals.is_file()
        and any(row["step"] == point.num_steps for row in read_metrics(evals))
    )


def run(sweep_dir: str | pathlib.Path, log: Callable[[str], None] = print) -> list[dict]:
    """Trains the plan's unfinished points in order (each resumes from its checkpoint), refreshing results.csv."""
    sweep_dir = pathlib.Path(sweep_dir).absolute()
    points = read_plan(sweep_dir)
    rows = []
    for i, point in enumerate(points, 1):
        prefix = f"[{i}/{len(points)}] {point.name}"
        if is_finished(sweep_dir, point):
            log(f"{prefix}: finished before, skipped")
        else:
            log(f"{prefix}: training {point.num_steps} steps, {len(points) - i} point(s) after it")
            config_lib.parse_gin([str(sweep_dir / point.name / POINT_GIN)])
            loop.train(str(sweep_dir / point.name))
        rows = collect_results(sweep_dir, points)
        results.write_results(sweep_dir / "results.csv", rows)
    log(f"{len(rows)} of {len(points)} points finished; results in {sweep_dir / 'results.csv'}")
    return rows


def collect_results(sweep_dir: str | pathlib.Path, points: list[Point]) -> list[dict]:
    """One results row per finished point, in plan order.

    N is the total parameter count (`param_count`, embeddings included, as the planner sized
    the points; N_non_embedding is Kaplan's); D = steps × tokens per step (padding included);
    C = steps × batch × `flops.training_flops_per_sequence` (exact, not 6ND); loss is the final
    validation loss; train_loss is the cross-entropy (z-loss removed) averaged over the logged
    rows of the last SMOOTHING_FRACTION of training.
    """
    rows = []
    for point in points:
        if not is_finished(sweep_dir, point):
            continue
        run_dir = pathlib.Path(sweep_dir) / point.name
        final_eval = next(r for r in read_metrics(run_dir / "eval_metrics.jsonl") if r["step"] == point.num_steps)
        rows.append(
            {
                "config": point.name,
                "N": param_count(point.config),
                "D": point.tokens,
                "C": point.flops,
                "loss": final_eval["loss"],
                "train_loss": _smoothed_train_loss(run_dir, point.num_steps),
                "N_non_embedding": flops.non_embedding_param_count(point.config),
                "budget": point.budget,
                "steps": point.num_steps,
            }
        )
    return rows


def _smoothed_train_loss(run_dir: pathlib.Path, num_steps: int) -> float:
    logged = [r for r in read_metrics(run_dir / "train_metrics.jsonl") if r["step"] <= num_steps]
    tail = [r for r in logged if r["step"] > num_steps * (1 - SMOOTHING_FRACTION)] or logged[-1:]
    return float(np.mean([r["loss"] - r["z_loss"] for r in tail]))


def _point_gin(spec: SweepSpec, point: Point) -> str:
    """Evaluation only at the end: the final validation loss is what a point is for."""
    lines = [
        f"# IsoFLOP point {point.name}: C = {point.budget:.3g} FLOPs planned, {point.num_steps} steps of "
        f"{point.tokens_per_step} tokens. Written by `t5lite sweep plan`.",
        f"include {spec.base_gin!r}",
        "",
        *spec.bindings,
        *config_lib.gin_bindings(point.config),
        f"train.num_steps = {point.num_steps}",
        f"train.eval_every = {point.num_steps}",
    ]
    return "\n".join(lines) + "\n"


def _write_plan_csv(path: pathlib.Path, points: list[Point]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["name", "budget", "d_model", "layers", "N", "N_non_embedding", "num_steps", "tokens", "flops"])
        for p in points:
            writer.writerow(
                [
                    p.name,
                    p.budget,
                    p.config.d_model,
                    p.config.num_decoder_layers,
                    param_count(p.config),
                    flops.non_embedding_param_count(p.config),
                    p.num_steps,
                    p.tokens,
                    p.flops,
                ]
            )


def _resolve_gin(name: str) -> str:
    """An existing path becomes absolute (point gins live elsewhere); a shipped config stays relative."""
    if pathlib.Path(name).is_file():
        return str(pathlib.Path(name).absolute())
    if (config_lib.GIN_CONFIG_DIR / name).is_file():
        return name
    raise FileNotFoundError(
        f"Base run gin {name!r} not found here or under {config_lib.GIN_CONFIG_DIR}; "
        "shipped run configs are runs/*.gin."
    )
