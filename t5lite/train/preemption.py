"""Stopping a run cleanly when asked: SIGTERM (preemptible TPU VMs, SLURM, Kubernetes) or Ctrl-C.

The loop finishes the step it is on, saves a checkpoint with the data state and stops; a rerun of
the same command resumes there. A second Ctrl-C aborts at once. In a multi-process run every
process must stop at the same step, so JAX's preemption service (started by
`jax.distributed.initialize`, which owns SIGTERM there) agrees on it: a process that receives
SIGTERM tells the others, and all of them reach the sync point at one step. Ctrl-C in a
multi-process run is passed on to that service as a SIGTERM.
"""

from __future__ import annotations

import signal
import threading

EXIT_CODES = {signal.SIGTERM: 0, signal.SIGINT: 130}  # 130: the shell's code for Ctrl-C


class Interrupted(Exception):
    """The run stopped at `step` when asked to, its checkpoint saved."""

    def __init__(self, step: int, signum: int):
        self.step, self.exit_code = step, EXIT_CODES.get(signum, 0)
        self.message = f"Interrupted at step {step}; checkpoint saved, rerun the same command to resume."
        super().__init__(self.message)


class StopRequests:
    """Signal handlers for the duration of a training loop (`with StopRequests() as stop:`);
    `stop.now(step)` says whether to save and stop after `step`."""

    def __init__(self):
        self.signum: int | None = None
        self._previous, self._processes = {}, 1

    def __enter__(self) -> StopRequests:
        import jax  # here, so that the CLI can catch Interrupted without importing JAX

        self._processes = jax.process_count()
        if self._processes > 1 and not jax.config.jax_enable_preemption_service:
            self._processes = 0  # no way to agree on a step: signals keep their usual effect
        if self._processes and threading.current_thread() is threading.main_thread():
            caught = (signal.SIGINT,) if self._processes > 1 else (signal.SIGINT, signal.SIGTERM)
            self._previous = {signum: signal.signal(signum, self._handle) for signum in caught}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C
        self.signum = self.signum or signum
        again = " (Ctrl-C again to abort at once)" if signum == signal.SIGINT else ""
        print(
            f"\n{signal.Signals(signum).name} received: stopping after this step with a checkpoint{again}.", flush=True
        )
        if self._processes > 1 and signum == signal.SIGINT:
            signal.raise_signal(signal.SIGTERM)  # to JAX's preemption service, which tells the others

    def now(self, step: int) -> bool:
        """True once a stop was asked for: at once with one process; with several, at the step the
        processes agreed on (call it at every step, on every process)."""
        if not self._processes:
            return False
        if self._processes > 1:
            from jax.experimental import multihost_utils

            if multihost_utils.reached_preemption_sync_point(step):
                self.signum = self.signum or signal.SIGTERM
                return True
            return False
        return self.signum is not None
