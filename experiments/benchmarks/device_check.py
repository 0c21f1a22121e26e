"""The accelerator check: what to run first on a GPU or TPU machine, one markdown table out.

    bash experiments/benchmarks/device_check.sh [--out device_check.md] [--tiny]

1. kernels: tests/kernels/test_on_device.py (Pallas flash attention forward+backward over every case,
   float32 and bfloat16, and the int8 matmul, against float64 references) on the device;
2. attention.py at 1k-16k tokens, causal, without and with a T5 bias: Pallas vs cuDNN / XLA;
3. int8_matmul.py at 1k-8k: int8 vs bf16;
4. one train step of a 1B-parameter decoder (llama/1b, bf16, batch 4 x 2048, AdamW): MFU.
Each part runs on its own, so a failure shows as a row and the others still report. Without an
accelerator (or with --tiny) every part runs at tiny sizes, the kernels in interpret mode: that run
shows the check works, not how fast anything is (tests/test_device_check.py runs it in CI).
"""

import argparse
import csv
import datetime
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

import jax
from common import device_description, on_accelerator

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
# (goal for Pallas flash fwd+bwd vs cuDNN without a bias, vs XLA with a materialised T5 bias, int8 vs
# bf16 at 8192³, 1B decoder MFU), from the speed issue's goals for an H100.
GOALS = {"cudnn": 1.0, "t5_bias_vs_xla": 3.0, "int8": 1.7, "mfu": 0.45}


def row(part, setting, result, goal="", status=""):
    return {"part": part, "setting": setting, "result": result, "goal": goal, "status": status}


def against(goal: str, met: bool, checked: bool) -> tuple[str, str]:
    """The goal and status columns of a row: judged only at the sizes a goal is set for."""
    return (goal, "pass" if met else "below goal") if checked else ("", "")


def run(command, env=None, timeout=600):
    """(ok, last lines of output) of a subprocess run from the repository root."""
    try:
        done = subprocess.run(
            command, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout} s"
    tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
    return done.returncode == 0, " / ".join(tail)


def kernels(tiny, workdir):
    report = workdir / "kernels.xml"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}"]
    command += ["tests/kernels/test_on_device.py"]
    env = {"JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "")}
    if tiny:  # interpret mode is slow: one attention case in each dtype, the int8 scalings with groups
        command += ["-k", "mqa_packed_alibi or channel_zero_points or group"]
        env = {"T5LITE_KERNEL_BACKEND": "interpret", "JAX_PLATFORMS": "cpu"}
    _, tail = run(command, env)
    if not report.exists():
        return [row("kernels", "pytest tests/kernels/test_on_device.py", tail, "all pass", "ERROR")]
    rows = []
    for case in ET.parse(report).getroot().iter("testcase"):
        problem = next((c for c in case if c.tag in ("failure", "error", "skipped")), None)
        status = "pass" if problem is None else problem.tag.upper()
        detail = "" if problem is None else (problem.get("message") or "").splitlines()[0][:160]
        rows.append(row("kernels", case.get("name"), detail or f"{float(case.get('time')):.1f} s", "all pass", status))
    return rows or [row("kernels", "pytest", tail, "all pass", "ERROR")]


def _csv_rows(script, args, workdir):
    out = workdir / f"{script}.csv"
    ok, tail = run([sys.executable, str(HERE / f"{script}.py"), *args, "--csv", str(out)])
    if not ok or not out.exists():
        return None, tail
    with open(out) as f:
        return list(csv.DictReader(f)), tail


def attention(tiny, workdir):
    lengths = ["128"] if tiny else ["1024", "2048", "4096", "8192", "16384"]
    rows, tail = _csv_rows(
        "attention", ["--lengths", *lengths, "--causal", "--repeats", "1" if tiny else "10"], workdir
    )
    if rows is None:
        return [row("attention", "attention.py", tail, "", "ERROR")]
    out = []
    for r in (r for r in rows if r["impl"] == "pallas"):
        bias = r["t5_bias"] == "True"
        other, goal = ("xla", GOALS["t5_bias_vs_xla"]) if bias else ("jax.nn", GOALS["cudnn"])
        speedup = 1 / float(r[f"pallas/{other}"])
        checked = r["pass"] == "fwd+bwd" and int(r["T"]) >= 4096 and not tiny
        out.append(
            row(
                "attention",
                f"T={r['T']} causal {r['pass']}{' T5 bias' if bias else ''}",
                f"{float(r['tflops']):.1f} TFLOP/s, {speedup:.2f}x {other}",
                *against(f">= {goal}x {other}", speedup >= goal, checked),
            )
        )
    return out


def int8(tiny, workdir):
    sizes = ["128"] if tiny else ["1024", "2048", "4096", "8192"]
    rows, tail = _csv_rows("int8_matmul", ["--sizes", *sizes, "--repeats", "1" if tiny else "10"], workdir)
    if rows is None:
        return [row("int8", "int8_matmul.py", tail, "", "ERROR")]
    out = []
    for r in rows:
        speedup = 1 / float(r["int8_over_bf16"])
        checked = int(r["size"]) == 8192
        out.append(
            row(
                "int8",
                f"{r['size']}³",
                f"{float(r['int8_tops']):.1f} TOP/s, {speedup:.2f}x bf16",
                *against(f">= {GOALS['int8']}x bf16", speedup >= GOALS["int8"], checked),
            )
        )
    return out


def train_mfu(tiny):
    """A decoder's train step (jitted, state donated) and its MFU against the chip's bf16 peak (on a
    CPU, against a measured float32 matmul, see t5lite.train.metrics)."""
    try:
        from train_step import batch_of, t5lite_step

        from t5lite import hardware
        from t5lite.models import get_config
        from t5lite.models.flops import mfu, training_flops_per_sequence
        from t5lite.train.metrics import measure_peak_flops

        name, batch, length = ("llama/tiny", 2, 64) if tiny else ("llama/1b", 4, 2048)
        config = get_config(name).replace(dtype="bfloat16", remat_policy="none")
        step = t5lite_step(config, batch_of(config, batch, 0, length))
        step()  # compile
        times = []
        for _ in range(3 if tiny else 5):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        device = jax.devices()[0]
        peak = hardware.peak_flops_per_device(device) or measure_peak_flops()
        flops = batch * training_flops_per_sequence(config, 0, length)
        value = mfu(flops, seconds, 1, peak)
    except Exception as error:  # e.g. out of memory, a missing package on the lent machine
        return [row("train", "decoder step", f"{type(error).__name__}: {str(error)[:160]}", "", "ERROR")]
    return [
        row(
            "train",
            f"{name} bf16, batch {batch} x {length}, AdamW",
            f"{seconds * 1e3:.0f} ms/step, {flops / seconds / 1e12:.1f} TFLOP/s, MFU {value:.1%}",
            *against(f">= {GOALS['mfu']:.0%} MFU", value >= GOALS["mfu"], not tiny),
        )
    ]


def markdown(rows, header):
    lines = [header, "", "| part | setting | result | goal | status |", "|---|---|---|---|---|"]
    lines += [f"| {r['part']} | {r['setting']} | {r['result']} | {r['goal']} | {r['status']} |" for r in rows]
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="device_check.md")
    p.add_argument("--tiny", action="store_true", help="tiny sizes, kernels interpreted (automatic without a device)")
    args = p.parse_args()
    tiny = args.tiny or not on_accelerator()
    commit = run(["git", "rev-parse", "--short", "HEAD"])[1]
    header = (
        f"device check on {device_description()}, jax {jax.__version__}, commit {commit}, "
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC{' (tiny)' if tiny else ''}"
    )
    print(header, flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for part in (kernels, attention, int8):
            start = time.perf_counter()
            rows += part(tiny, pathlib.Path(workdir))
            print(f"{part.__name__}: {time.perf_counter() - start:.0f} s", flush=True)
    rows += train_mfu(tiny)
    text = markdown(rows, header)
    pathlib.Path(args.out).write_text(text)
    print(text)
    print(f"wrote {args.out}")
    return 1 if any(r["status"] in ("ERROR", "FAILURE", "SKIPPED") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
