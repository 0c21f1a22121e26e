"""Where derived data (the embedded corpus, trained vocabularies) is kept between runs.

Everything here is rebuilt on demand, so the cache may be deleted at any time. A file is
built by one process while the others wait for it (pytest workers, the processes of one host),
and written atomically, so no reader ever sees half of one.
"""

from __future__ import annotations

import fcntl
import os
import pathlib
import tempfile
from collections.abc import Callable

ENV_VAR = "T5LITE_CACHE"
DEFAULT_DIR = "~/.cache/t5lite"


def cache_dir(*parts: str) -> pathlib.Path:
    """`$T5LITE_CACHE/<parts>` (default `~/.cache/t5lite/<parts>`), created if missing."""
    path = pathlib.Path(os.environ.get(ENV_VAR) or DEFAULT_DIR).expanduser().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def build_once(path: pathlib.Path, make: Callable[[], bytes]) -> pathlib.Path:
    """`path`, written with `make()` unless it exists; concurrent callers build it only once."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        lock_file = path.parent / f".{path.name}.lock"
        try:
            with open(lock_file, "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if not path.exists():
                    write_atomically(path, make())
        finally:  # a waiter holding the old lock then finds the file built (or builds it again, atomically)
            lock_file.unlink(missing_ok=True)
    return path


def write_atomically(path: pathlib.Path, data: bytes) -> pathlib.Path:
    """Writes `data` to a temporary file next to `path`, then renames it into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a shared cache from other users
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path
