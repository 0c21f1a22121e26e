"""Test-wide settings: CPU backend with 8 virtual devices (set before JAX is imported), one XLA
compilation cache for the run, and a temporary t5lite cache so that tests never write into the
user's ~/.cache."""

import os
import tempfile

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA aborts the process when the threads of a collective on virtual devices do not all arrive
# within its timeout; on a loaded 2-core machine (two pytest workers, each with 8 device threads)
# they can be late without anything being wrong, so the tests wait longer than XLA's default.
SLOW_MACHINE_COLLECTIVES = (
    "--xla_cpu_collective_call_warn_stuck_timeout_seconds=300 --xla_cpu_collective_call_terminate_timeout_seconds=900"
)
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {SLOW_MACHINE_COLLECTIVES}")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Many tests (and the `t5lite` processes they start, which inherit this) compile the same tiny
# train steps; JAX's persistent cache compiles each once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "t5lite-tests-xla-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


@pytest.fixture(scope="session", autouse=True)
def t5lite_cache(tmp_path_factory):
    """One cache per test run, shared by pytest-xdist workers (files are written atomically), so
    the corpus and the default vocabulary are built at most once per worker."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "t5lite_cache"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("T5LITE_CACHE", str(root))
        yield root
