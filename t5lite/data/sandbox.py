"""Runs untrusted Python programs (a model's code followed by hidden tests) in child processes.

Code sampled from a model is run to be scored (pass@k), so a wrong sample must cost at most its
own result: never the evaluator, the other samples or the machine. Each program runs in its own
`python -I` process, in its own session, with:

  time      a wall-clock limit (the whole process group is killed) and a CPU-time limit
  memory    an address-space limit (RLIMIT_AS): a large allocation raises MemoryError
  files     a fresh temporary working directory, removed afterwards; writes outside it refused;
            destructive os/shutil/subprocess functions replaced by ones that raise; no file over
            `file_mb` (RLIMIT_FSIZE, which also bounds the captured output); no core dumps
  network   a new network namespace where the kernel allows it (as root, or through an
            unprivileged user namespace): only a loopback that is down, so every connection
            fails; and always socket creation raises
  env       no inherited environment variables besides PATH, locale, HOME, TMPDIR and one-thread
            settings for numeric libraries

All of this is best effort, like OpenAI human-eval's `reliability_guard`: it contains the
accidents of generated code, not an adversary. The guards are Python-level, so `ctypes` calls to
libc get past them (as do reads of any file the user may read); only the resource limits, the
namespace and the process group hold against such code. Run evaluations of untrusted models in a
container or VM as well.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import logging
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

PASSED, FAILED, TIMEOUT, MEMORY, ERROR = "passed", "failed", "timeout", "memory", "error"
DETAIL_CHARS = 300

# The child's network isolation, shared by the child and by `can_isolate_network`'s probe.
_ISOLATE_NETWORK = r'''
import ctypes

def isolate_network():
    """Enters a new network namespace (CLONE_NEWNET), inside a new user namespace (CLONE_NEWUSER)
    where the process lacks CAP_SYS_ADMIN; False where the kernel allows neither."""
    libc = ctypes.CDLL(None, use_errno=True)
    return any(libc.unshare(flags) == 0 for flags in (0x40000000, 0x10000000 | 0x40000000))
'''

# The child: argv = [verdict fd, config path]. It reports {"status", "detail"} through the verdict
# pipe, so a program that exits early (os._exit(0)) or is killed has no verdict and cannot pass.
_CHILD = (
    _ISOLATE_NETWORK
    + r'''
import builtins, io, json, linecache, os, posix, resource, shutil, signal, socket, _socket, subprocess, sys

DISABLED = {
    (os, posix): """kill killpg system popen remove unlink rmdir removedirs rename renames replace truncate
        chmod fchmod lchmod chown fchown lchown chflags lchflags chroot chdir fchdir link symlink mkfifo mknod
        fork forkpty vfork execv execve execl execle execlp execlpe execvp execvpe spawnl spawnle spawnlp
        spawnlpe spawnv spawnve spawnvp spawnvpe posix_spawn posix_spawnp setuid seteuid setgid setegid
        setreuid setregid setresuid setresgid setsid setpgid plock""",
    (shutil,): "rmtree move chown",
    (subprocess,): "Popen call run check_call check_output getoutput getstatusoutput",
    (socket, _socket): "socketpair fromfd create_connection create_server getaddrinfo gethostbyname",
}


def refuse(name):
    def refused(*args, **kwargs):
        raise PermissionError(f"{name} is disabled in the sandbox")

    return refused


def limit(config):
    resource.setrlimit(resource.RLIMIT_AS, (config["memory_bytes"],) * 2)
    resource.setrlimit(resource.RLIMIT_CPU, (config["cpu_s"], config["cpu_s"] + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (config["file_bytes"],) * 2)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an oversized write raises instead of killing


def inside(path, root):
    if isinstance(path, int):
        return True
    real = os.path.realpath(os.fsdecode(path))
    return real == root or real.startswith(root + os.sep)


def guard(root):
    for modules, names in DISABLED.items():
        for module in modules:
            for name in names.split():
                if hasattr(module, name):
                    setattr(module, name, refuse(f"{module.__name__}.{name}"))
    for module in (socket, _socket):
        module.socket = type("socket", (module.socket,), {"__init__": refuse("network access")})
    builtin_open, os_open = builtins.open, os.open
    writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def open_inside(file, mode="r", *args, **kwargs):
        if set(mode) & set("wax+") and not inside(file, root):
            raise PermissionError(f"writing {file!r} outside the sandbox's directory is disabled")
        return builtin_open(file, mode, *args, **kwargs)

    def os_open_inside(path, flags, *args, **kwargs):
        if flags & writes and not inside(path, root):
            raise PermissionError(f"writing {path!r} outside the sandbox's directory is disabled")
        return os_open(path, flags, *args, **kwargs)

    builtins.open = io.open = open_inside
    os.open = posix.open = os_open_inside


def describe(error, source):
    tb, line = error.__traceback__, 0
    while tb is not None:  # the innermost line of the program, e.g. the failing assert
        if tb.tb_frame.f_code.co_filename == "<candidate>":
            line = tb.tb_lineno
        tb = tb.tb_next
    where = f" at line {line}: {source[line - 1].strip()}" if 0 < line <= len(source) else ""
    return f"{type(error).__name__}{where}" + (f" ({error})" if str(error) else "")


def run(program):
    source = program.splitlines()
    linecache.cache["<candidate>"] = (len(program), None, program.splitlines(True), "<candidate>")
    try:
        exec(compile(program, "<candidate>", "exec"), {"__name__": "__main__", "__builtins__": builtins})
    except AssertionError as error:
        return "failed", describe(error, source)
    except MemoryError as error:
        return "memory", describe(error, source)
    except SystemExit as error:
        return "error", f"exited (code {error.code!r}) before the tests finished"
    except BaseException as error:
        return "error", describe(error, source)
    return "passed", ""


def main():
    exit_now, verdict = os._exit, os.fdopen(int(sys.argv[1]), "w")
    with open(sys.argv[2]) as f:
        config = json.load(f)
    os.unlink(sys.argv[2])  # the hidden tests are not left for the program to read
    isolate_network()
    limit(config)
    guard(os.path.realpath(os.getcwd()))
    status, detail = run(config["program"])
    verdict.write(json.dumps({"status": status, "detail": detail}))
    verdict.close()
    sys.stdout.flush()
    sys.stderr.flush()
    exit_now(0)  # not waiting for threads the program left running


main()
'''
)


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one program may use. `cpu_s` None: the wall-clock limit, rounded up."""

    timeout_s: float = 3.0
    cpu_s: int | None = None
    memory_mb: int = 512
    file_mb: int = 16
    output_chars: int = 2000

    def __post_init__(self):
        integers = ("memory_mb", "file_mb", "output_chars") + (("cpu_s",) if self.cpu_s is not None else ())
        for name in ("timeout_s", *integers):
            value, kind = getattr(self, name), int if name in integers else int | float
            if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
                noun = "integer" if kind is int else "number"
                raise ValueError(f"Sandbox limit {name}={value!r} must be a positive {noun}.")

    @property
    def cpu_seconds(self) -> int:
        return self.cpu_s or math.ceil(self.timeout_s)


DEFAULT_LIMITS = Limits()


@dataclasses.dataclass(frozen=True)
class ExecutionResult:
    """How one program ended: `status` is one of passed/failed (an assertion)/timeout/memory/error;
    `detail` says where, e.g. "AssertionError at line 9: assert add(1, 2) == 3"; `stdout` and
    `stderr` are the first `Limits.output_chars` of each."""

    status: str
    detail: str = ""
    stdout: str = ""
    stderr: str = ""

    @property
    def passed(self) -> bool:
        return self.status == PASSED


def run_program(program: str, limits: Limits = DEFAULT_LIMITS) -> ExecutionResult:
    """Runs `program` in a sandboxed child process (see the module docstring) and says how it ended."""
    if not isinstance(program, str):
        raise ValueError(f"A sandboxed program must be a string of Python source, not {type(program).__name__}.")
    with tempfile.TemporaryDirectory(prefix="t5lite-sandbox-") as root:
        workdir = os.path.join(root, "work")
        os.mkdir(workdir, 0o700)
        config_path = os.path.join(root, "config.json")
        with open(config_path, "w") as f:
            json.dump(_child_config(program, limits), f)
        with open(os.path.join(root, "stdout"), "w+b") as out, open(os.path.join(root, "stderr"), "w+b") as err:
            verdict, timed_out, returncode = _run_child(config_path, workdir, out, err, limits.timeout_s)
            stdout, stderr = (_head(stream, limits.output_chars) for stream in (out, err))
    status, detail = _judge(verdict, timed_out, returncode, stderr, limits)
    return ExecutionResult(status, detail[:DETAIL_CHARS], stdout, stderr)


def run_programs(
    programs: Sequence[str], limits: Limits = DEFAULT_LIMITS, max_workers: int = 2
) -> list[ExecutionResult]:
    """`run_program` over `programs`, `max_workers` at a time; results in the order of `programs`."""
    if not isinstance(max_workers, int) or max_workers < 1:
        raise ValueError(f"max_workers={max_workers!r} must be a positive integer.")
    can_isolate_network()  # warns once where only the Python-level guard stops network use
    with concurrent.futures.ThreadPoolExecutor(max_workers) as pool:
        return list(pool.map(functools.partial(run_program, limits=limits), programs))


@functools.cache
def can_isolate_network() -> bool:
    """Whether children get their own network namespace here; logs a warning once if not."""
    probe = _ISOLATE_NETWORK + "\nimport sys\nsys.exit(0 if isolate_network() else 1)\n"
    isolated = subprocess.run([sys.executable, "-I", "-c", probe], env=_environment("/"), check=False).returncode == 0
    if not isolated:
        logging.warning(
            "This kernel allows no unprivileged network namespace: sandboxed programs are kept off the "
            "network only by replacing Python's socket functions, which ctypes code gets past."
        )
    return isolated


def _child_config(program: str, limits: Limits) -> dict:
    return {
        "program": program,
        "memory_bytes": limits.memory_mb << 20,
        "cpu_s": limits.cpu_seconds,
        "file_bytes": limits.file_mb << 20,
    }


def _environment(workdir: str) -> dict[str, str]:
    """Nothing of the parent's environment (tokens, paths); numeric libraries on one thread, as the
    parallelism is across programs and thread pools would not fit the memory limit."""
    threads = {name: "1" for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    return {"PATH": os.defpath, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir, **threads}


def _run_child(config_path: str, workdir: str, out, err, timeout_s: float) -> tuple[dict | None, bool, int]:
    """Starts the child in its own session, waits up to `timeout_s`, then kills its whole process
    group (stragglers too); returns (verdict or None, whether it timed out, return code)."""
    read_end, write_end = os.pipe()
    try:
        command = [sys.executable, "-I", "-B", "-u", "-X", "utf8", "-c", _CHILD, str(write_end), config_path]
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            cwd=workdir,
            env=_environment(workdir),
            pass_fds=(write_end,),
            start_new_session=True,
        )
        os.close(write_end)
        write_end = -1
        timed_out = not _exited_by(process.pid, time.monotonic() + timeout_s)
        _kill_group(process.pid)
        returncode = process.wait()
        return _read_verdict(read_end), timed_out, returncode
    finally:
        for fd in (read_end, write_end):
            if fd >= 0:
                os.close(fd)


def _exited_by(pid: int, deadline: float) -> bool:
    """Waits for `pid` to exit without reaping it, so its id (its group's id) is not reused before
    the group is killed."""
    pause = 0.001
    while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        if time.monotonic() >= deadline:
            return False
        time.sleep(pause)
        pause = min(pause * 2, 0.02)
    return True


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _read_verdict(fd: int) -> dict | None:
    """What the child wrote to the verdict pipe; never blocks (a process outside the group might
    still hold the pipe)."""
    os.set_blocking(fd, False)
    chunks = []
    try:
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    except BlockingIOError:
        pass
    try:
        return json.loads(b"".join(chunks)) if chunks else None
    except ValueError:
        return None


def _head(stream, chars: int) -> str:
    stream.seek(0)
    text = stream.read(4 * chars).decode("utf-8", errors="replace")
    return text if len(text) <= chars else text[:chars] + "\n[... truncated]"


def _judge(verdict: dict | None, timed_out: bool, returncode: int, stderr: str, limits: Limits) -> tuple[str, str]:
    if timed_out:
        return TIMEOUT, f"no result within the {limits.timeout_s:g} s wall-clock limit"
    if verdict is not None and returncode == 0:
        if verdict["status"] == MEMORY:
            return MEMORY, f"over the {limits.memory_mb} MiB memory limit: {verdict['detail']}"
        return verdict["status"], verdict["detail"]
    if returncode == -signal.SIGXCPU:
        return TIMEOUT, f"over the {limits.cpu_seconds} s CPU-time limit"
    if returncode < 0:
        return ERROR, f"killed by {signal.Signals(-returncode).name}"
    last_line = "".join(stderr.strip().splitlines()[-1:])
    return ERROR, f"exited with code {returncode} before the tests finished" + (f": {last_line}" if last_line else "")
