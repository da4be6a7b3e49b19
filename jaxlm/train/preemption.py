"""Stopping cleanly on SIGINT (Ctrl-C) and SIGTERM (TPU / cloud / SLURM preemption).

While training runs, the first signal only sets a flag: the loop finishes the step in flight, saves
a checkpoint with the data-iterator state, and stops with exit status 130 (SIGINT) or 143 (SIGTERM).
A second SIGINT interrupts at once (the last saved checkpoint stays good).

With several processes every one must stop at the same step, or the others would wait forever in
the next collective. JAX's preemption service (started by `jax.distributed.initialize`) catches
SIGTERM in any process and agrees on the step with `reached_preemption_sync_point`; a Ctrl-C in one
process is turned into that same notice (SIGTERM to itself).
"""

from __future__ import annotations

import os
import signal
import threading

import jax

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class StopSignals:
    """`with StopSignals() as stop:` ... `if stop.requested(step): save and stop`."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict = {}
        self._multi = jax.process_count() > 1

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            return self  # signals can only be handled in the main thread
        self._old[signal.SIGINT] = signal.signal(signal.SIGINT, self._handle)
        if not self._multi:  # with several processes JAX's preemption service owns SIGTERM
            self._old[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def _handle(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        first = self.signum is None
        self.signum = signum
        if self._multi and first:
            os.kill(os.getpid(), signal.SIGTERM)  # tell every process, through JAX's preemption service

    def requested(self, step: int) -> bool:
        """True at the step where this process (and, with several, every process) should save and stop."""
        if not self._multi:
            return self.signum is not None
        from jax.experimental import multihost_utils

        try:
            reached = multihost_utils.reached_preemption_sync_point(step)
        except RuntimeError:  # the preemption service is off: only a local signal can stop
            return self.signum is not None
        if reached and self.signum is None:
            self.signum = signal.SIGTERM
        return reached

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signum, 1)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""
