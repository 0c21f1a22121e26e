"""One writer per model dir: a live holder refuses a second trainer; a dead one's lock is taken over."""

import json
import subprocess
import sys

import pytest

from t5lite.train.run_lock import RunLock, RunLocked


def test_a_held_lock_refuses_a_second_holder_naming_the_first(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RunLocked, match=r"is being trained by pid \d+ on .*one trainer per model dir"):
            RunLock(tmp_path).acquire()
    with RunLock(tmp_path):  # released: free again
        pass
    assert (tmp_path / ".lock").read_text() == ""  # a clean exit leaves no holder behind


def test_the_lock_of_a_killed_process_is_taken_over(tmp_path, capsys):
    """A process that held the lock dies without releasing it (kill -9): the OS frees the lock, its
    file still names the dead holder, and the next trainer says whose lock it takes over."""
    holder = (
        "import sys, time; from t5lite.train.run_lock import RunLock; "
        "lock = RunLock(sys.argv[1]).acquire(); time.sleep(600)"
    )
    process = subprocess.Popen([sys.executable, "-c", holder, str(tmp_path)])
    try:
        while not (tmp_path / ".lock").is_file() or not (tmp_path / ".lock").read_text():
            assert process.poll() is None
        with pytest.raises(RunLocked, match=f"pid {process.pid} "):
            RunLock(tmp_path).acquire()
    finally:
        process.kill()
        process.wait()
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == process.pid
    with RunLock(tmp_path):
        assert f"Taking over the lock of pid {process.pid} on" in capsys.readouterr().out
