"""One writer per run: an exclusive lock on the model dir while a trainer writes to it.

The lock is `<model_dir>/.lock`, held with `fcntl.flock` for as long as the trainer runs (process 0
of a multi-process run holds it for all of them). The operating system releases it when its
holder exits, however it exits (kill -9 included), so a lock left by a dead process is taken over,
with a message; a live holder makes a second trainer refuse before it touches anything. The file
names its holder (host and pid) for that message. Locks need a file system that implements flock
across the machines that share it (local disks and NFSv4 do; some FUSE mounts do not).
"""

from __future__ import annotations

import fcntl
import json
import os
import pathlib
import socket
import time

LOCK_FILE = ".lock"


class RunLocked(ValueError):
    """Another live trainer holds the model dir."""


class RunLock:
    """`with RunLock(model_dir):` holds the lock, or raises RunLocked naming its holder."""

    def __init__(self, model_dir: str | pathlib.Path):
        self.path = pathlib.Path(model_dir) / LOCK_FILE
        self._file = None

    def acquire(self) -> RunLock:
        if self._file is not None:
            return self
        file = open(self.path, "a+")  # held open for as long as the lock
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(file)
            file.close()
            raise RunLocked(
                f"{self.path.parent} is being trained by {holder}; one trainer per model dir. Wait for it, "
                f"stop it, or use another --model_dir."
            ) from None
        previous = _holder(file)
        if previous != "an unknown process":
            print(f"Taking over the lock of {previous}, which is no longer running.", flush=True)
        file.seek(0)
        file.truncate()
        file.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}))
        file.flush()
        self._file = file
        return self

    def release(self) -> None:
        """Empties the file (a clean exit leaves no holder to report) and lets go of the lock."""
        if self._file is None:
            return
        self._file.seek(0)
        self._file.truncate()
        self._file.close()  # closing releases the flock
        self._file = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _holder(file) -> str:
    file.seek(0)
    try:
        holder = json.loads(file.read())
        return f"pid {holder['pid']} on {holder['host']}"
    except (json.JSONDecodeError, KeyError, TypeError):
        return "an unknown process"
