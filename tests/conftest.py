"""Test-wide settings: CPU backend with 8 virtual devices (set before JAX is imported), one XLA
compilation cache for the run, and a temporary t5lite cache so that tests never write into the
user's ~/.cache."""

import os
import tempfile

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
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
