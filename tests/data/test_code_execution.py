"""pass@k, the sandbox that runs generated code, and the built-in code task `t5lite_code`."""

import math
import os
import socket
import time
from fractions import Fraction

import numpy as np
import pytest
import seqio

from t5lite.data import code_tasks, sandbox

FAST = sandbox.Limits(timeout_s=1.5, memory_mb=256)
PASSING = "def add(a, b):\n    return a + b\n\nassert add(1, 2) == 3\n"


def run(program, limits=FAST):
    return sandbox.run_program(program, limits)


# pass@k


def test_pass_at_k_hand_computed_values():
    assert code_tasks.pass_at_k(2, 1, 1) == pytest.approx(0.5)
    assert code_tasks.pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert code_tasks.pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert code_tasks.pass_at_k(4, 2, 3) == pytest.approx(1.0)  # n - c < k: any 3 of 4 include a pass
    assert code_tasks.pass_at_k(10, 0, 10) == 0.0
    assert code_tasks.pass_at_k(10, 10, 1) == 1.0


def test_pass_at_k_is_the_combinatorial_formula_and_vectorises():
    cases = [(n, c, k) for n in range(1, 13) for c in range(n + 1) for k in range(1, n + 1)]
    for n, c, k in cases:
        assert code_tasks.pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)
    n, c = np.array([[10, 10, 5]]), np.array([[0, 3, 5]])
    estimates = code_tasks.pass_at_k(n, c, 2)
    assert estimates.shape == (1, 3)
    np.testing.assert_allclose(estimates[0], [code_tasks.pass_at_k(10, 0, 2), code_tasks.pass_at_k(10, 3, 2), 1.0])
    exact = 1 - Fraction(math.comb(197, 100), math.comb(200, 100))  # binomials of 60 digits
    assert code_tasks.pass_at_k(200, 3, 100) == pytest.approx(float(exact), rel=1e-12)


@pytest.mark.parametrize(
    "n, c, k, message",
    [
        (3, 1, 4, "at least 4 samples"),
        (5, 1, 0, "positive integer k"),
        (5, 6, 1, "0 <= c <= n"),
        (5.0, 1, 1, "integer"),
    ],
)
def test_pass_at_k_rejects_bad_counts(n, c, k, message):
    with pytest.raises(ValueError, match=message):
        code_tasks.pass_at_k(n, c, k)


# The sandbox


def test_a_passing_program_passes_and_a_failing_assert_fails():
    assert run(PASSING).passed
    failed = run(PASSING.replace("a + b", "a - b"))
    assert failed.status == "failed" and not failed.passed
    assert failed.detail == "AssertionError at line 4: assert add(1, 2) == 3"


def test_a_timeout_kills_the_whole_process_group_and_spares_the_others():
    forks_and_loops = "import ctypes\npid = ctypes.CDLL(None).fork()\nif pid:\n    print(pid)\nwhile True:\n    pass\n"
    start = time.monotonic()
    results = sandbox.run_programs(
        [forks_and_loops, PASSING, "import time\ntime.sleep(60)\n", PASSING], sandbox.Limits(timeout_s=1)
    )
    assert time.monotonic() - start < 6
    assert [r.status for r in results] == ["timeout", "passed", "timeout", "passed"]
    assert "1 s wall-clock" in results[0].detail
    grandchild = int(results[0].stdout)
    time.sleep(0.2)
    assert not os.path.exists(f"/proc/{grandchild}") or _state(grandchild) == "Z"  # dead (maybe unreaped)


def _state(pid):
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def test_the_cpu_time_limit_stops_a_busy_loop():
    result = run("while True:\n    pass\n", sandbox.Limits(timeout_s=20, cpu_s=1))
    assert result.status == "timeout" and "CPU-time" in result.detail


def test_too_much_memory_fails_that_program_only():
    results = sandbox.run_programs(["block = bytearray(1 << 30)\n", PASSING], FAST)
    assert results[0].status == "memory" and "256 MiB" in results[0].detail
    assert results[1].passed


@pytest.mark.parametrize(
    "crash",
    [
        "raise RuntimeError('boom')",
        "import sys; sys.exit(1)",
        "import sys; sys.exit(0)",
        "import os; os._exit(0)",
        "import ctypes; ctypes.string_at(0)",
        "def f(:",
    ],
)
def test_a_crash_fails_only_itself(crash):
    results = sandbox.run_programs([PASSING + crash + "\n", PASSING], FAST)
    assert results[0].status == "error", results[0]
    assert results[1].passed


def test_files_outside_the_working_directory_survive(tmp_path):
    sentinel = tmp_path / "keep" / "sentinel.txt"
    sentinel.parent.mkdir()
    sentinel.write_text("precious")
    attacks = [
        f"import os\nos.remove({str(sentinel)!r})\n",
        f"import os\nos.unlink({str(sentinel)!r})\n",
        f"import shutil\nshutil.rmtree({str(sentinel.parent)!r})\n",
        f"open({str(sentinel)!r}, 'w').write('gone')\n",
        f"import pathlib\npathlib.Path({str(sentinel)!r}).write_text('gone')\n",
        f"import subprocess\nsubprocess.run(['rm', '-f', {str(sentinel)!r}])\n",
        f"import os\nos.system('rm -f {sentinel}')\n",
    ]
    for result in sandbox.run_programs(attacks, FAST):
        assert result.status == "error" and "PermissionError" in result.detail, result
    assert sentinel.read_text() == "precious"


@pytest.fixture
def listener():
    server = socket.create_server(("127.0.0.1", 0))
    yield server
    server.close()


def _assert_no_connection(server):
    server.setblocking(False)
    with pytest.raises(BlockingIOError):
        server.accept()


def test_network_use_fails_and_reaches_nothing(listener):
    port = listener.getsockname()[1]
    results = sandbox.run_programs(
        [
            f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\n",
            f"import socket\nsocket.socket().connect(('127.0.0.1', {port}))\n",
        ],
        FAST,
    )
    assert all(r.status == "error" for r in results), results
    _assert_no_connection(listener)


@pytest.mark.skipif(not sandbox.can_isolate_network(), reason="no network namespace for unprivileged processes here")
def test_the_network_namespace_holds_when_the_socket_guard_is_bypassed(listener):
    port = listener.getsockname()[1]
    unguarded = f"import _socket\nraw = _socket.socket.__mro__[1]()\nraw.connect(('127.0.0.1', {port}))\n"
    result = run(unguarded)
    assert result.status == "error" and "unreachable" in result.detail, result
    _assert_no_connection(listener)


def test_a_fresh_working_directory_is_removed_and_no_environment_leaks(monkeypatch):
    monkeypatch.setenv("T5LITE_TEST_SECRET", "token")
    program = (
        "import os\nassert os.listdir('.') == []\nopen('scratch.txt', 'w').write('x')\nprint(os.getcwd())\n"
        "assert 'T5LITE_TEST_SECRET' not in os.environ\n"
    )
    result = run(program)
    assert result.passed, result
    workdir = result.stdout.strip()
    assert workdir and not os.path.exists(workdir)


def test_output_is_captured_and_truncated():
    result = run("import sys\nprint('x' * 100_000)\nprint('oops', file=sys.stderr)\n", sandbox.Limits(output_chars=50))
    assert result.passed
    assert result.stdout == "x" * 50 + "\n[... truncated]" and result.stderr == "oops\n"


def test_limits_are_validated():
    with pytest.raises(ValueError, match="timeout_s=0"):
        sandbox.Limits(timeout_s=0)
    with pytest.raises(ValueError, match="cpu_s=1.5"):
        sandbox.Limits(cpu_s=1.5)
    with pytest.raises(ValueError, match="max_workers=0"):
        sandbox.run_programs([PASSING], max_workers=0)


# The metric and the task


def _targets(problems):
    return [{"prompt": p.prompt, "tests": p.tests} for p in problems]


def test_every_reference_solution_passes_and_wrong_bodies_fail():
    one_sample = code_tasks.make_pass_at_k_metric(samples=1)
    problems = code_tasks.PROBLEMS
    assert 20 <= len(problems) <= 30 and len({p.name for p in problems}) == len(problems)
    assert one_sample(_targets(problems), [[p.solution] for p in problems]) == {"pass@1": 100.0}
    assert one_sample(_targets(problems), [["    return None\n"] for _ in problems]) == {"pass@1": 0.0}


def test_a_mix_of_samples_scores_the_estimator():
    metric = code_tasks.pass_at_k_metric
    assert (metric.samples, metric.temperature) == (10, 0.8)
    wrong = "    return None\n"
    problems = code_tasks.PROBLEMS[:3]
    predictions = [
        [problems[0].solution] * 3 + [wrong] * 7,
        [problems[1].solution] * 10,
        [wrong] * 10,
    ]
    scores = metric(_targets(problems), predictions)
    assert scores["pass@1"] == pytest.approx(100 * (0.3 + 1 + 0) / 3)
    assert scores["pass@10"] == pytest.approx(100 * (1 + 1 + 0) / 3)


def test_code_after_the_function_body_is_not_run():
    add = code_tasks.PROBLEMS[0]
    completion = add.solution + "\nassert False\ndef add(a, b):\n    return 0\n"
    assert code_tasks.program(add.prompt, completion, add.tests) == add.prompt + add.solution + "\n" + add.tests
    assert run(code_tasks.program(add.prompt, completion, add.tests)).passed


@pytest.mark.parametrize(
    "targets, predictions, message",
    [
        ([{"prompt": "", "tests": ""}], [], "0 lists of samples for 1 targets"),
        ([], [], "at least one example"),
        ([{"prompt": "", "tests": ""}], ["    return 1\n"], "needs a list of sampled strings"),
        ([{"prompt": "", "tests": ""}], [[None] * 10], "needs a list of sampled strings"),
        ([{"prompt": "", "tests": ""}] * 2, [["x"] * 10, ["x"] * 9], r"same number of samples .* \[9, 10\]"),
        (["def f():"], [["x"] * 10], "postprocess_fn"),
    ],
)
def test_the_metric_rejects_malformed_input(targets, predictions, message):
    with pytest.raises(ValueError, match=message) as error:
        code_tasks.pass_at_k_metric(targets, predictions)
    assert "pass_at_k_metric" in str(error.value)


def test_registered_task_reads_a_validation_example():
    assert code_tasks.register_code_task() == "t5lite_code"
    task = seqio.get_mixture_or_task("t5lite_code")
    train, validation = code_tasks.examples("train"), code_tasks.examples("validation")
    assert train and validation and len(train) + len(validation) == len(code_tasks.PROBLEMS)
    assert not {r["inputs"] for r in train} & {r["inputs"] for r in validation}
    example = next(task.get_dataset(split="validation", shuffle=False).as_numpy_iterator())
    problem = next(p for p in code_tasks.PROBLEMS if p.prompt == example["inputs_pretokenized"].decode())
    vocab = task.output_features["targets"].vocabulary
    assert vocab.decode(example["inputs"].tolist()) == problem.prompt  # indentation survives the bytes vocabulary
    assert vocab.decode(example["targets"].tolist()) == problem.solution
    target = task.postprocess_fn(problem.solution, example=example, is_target=True)
    assert target == {"prompt": problem.prompt, "tests": problem.tests}
    assert task.postprocess_fn("    return 1\n", example=example, is_target=False) == "    return 1\n"
    (metric,) = task.predict_metric_fns
    assert (metric.samples, metric.temperature) == (10, 0.8)
    assert code_tasks.make_pass_at_k_metric(samples=1)([target], [[problem.solution]]) == {"pass@1": 100.0}
