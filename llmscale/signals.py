"""Preemption: a signal becomes a flag; the ranks agree at a step boundary, save, and exit "requeue me".

Cluster schedulers warn a job before they stop it: SLURM sends SIGUSR1 (``--signal=USR1@120``) or
SIGTERM, Kubernetes SIGTERM. The handler here only records the request (it never saves from inside a
signal handler). At the next step boundary every rank calls :meth:`Preemption.should_stop`, an
all-reduce of the flags, so all ranks leave the loop at the same step even if only one was signalled;
the trainer then saves a checkpoint and exits with :data:`EXIT_REQUEUE`::

    preempt = Preemption(grace_s=grace_from_env())   # installs the handlers
    for step in ...:
        train_step(...)
        if preempt.should_stop():
            manager.maybe_save(step, engine, stateful, force=True)
            return EXIT_REQUEUE

A second signal, or the hard deadline ``grace_s`` seconds after the first, ends the process at once
with :data:`EXIT_REQUEUE` (``os._exit``): checkpoints are written under a temporary name and renamed
only when complete, so dying mid-save leaves the previous checkpoint as the newest complete one and
the run resumes from it.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterable
from typing import Optional

from llmscale.log import get_logger

log = get_logger(__name__)

#: Exit status meaning "stopped early on purpose, state is saved (or the previous checkpoint is intact):
#: start me again with the same command". 75 is EX_TEMPFAIL from sysexits.h; launch scripts requeue on it
#: (``scontrol requeue $SLURM_JOB_ID`` or a retry loop).
EXIT_REQUEUE = 75

DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preemption:
    """Signal-to-flag handler with cross-rank agreement.

    ``grace_s``: hard deadline after the first signal (None = none); ``exit_fn`` is what the second
    signal or the deadline calls (default ``os._exit(EXIT_REQUEUE)``).
    """

    def __init__(
        self,
        *,
        signals: Iterable[int] = DEFAULT_SIGNALS,
        grace_s: Optional[float] = None,
        install: bool = True,
        exit_code: int = EXIT_REQUEUE,
        exit_fn: Optional[Callable[[int], None]] = None,
    ) -> None:
        self.signals = tuple(signals)
        self.grace_s = grace_s
        self.exit_code = exit_code
        self._exit_fn = exit_fn or os._exit
        self.requested = False
        self.signum: Optional[int] = None
        self.requested_at: Optional[float] = None
        self._previous: dict[int, object] = {}
        self._timer: Optional[threading.Timer] = None
        if install:
            self.install()

    # ---------------------------------------------------------------- handlers
    def install(self) -> Preemption:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("Preemption handlers can only be installed from the main thread.")
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def uninstall(self) -> None:
        for s, prev in self._previous.items():
            signal.signal(s, prev)  # type: ignore[arg-type]
        self._previous.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def __enter__(self) -> Preemption:
        return self

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested:
            # Second signal: the operator (or the scheduler) wants us gone now. Nothing on disk is left
            # half-valid: an unfinished save is only a .tmp-* folder.
            self._hard_exit(f"second signal {signal.Signals(signum).name}")
            return
        self.requested = True
        self.signum = signum
        self.requested_at = time.monotonic()
        log.warning(
            "Received %s: will save a checkpoint at the next step boundary and exit %d (requeue). "
            "Send it again to exit immediately.", signal.Signals(signum).name, self.exit_code,
        )
        if self.grace_s is not None:
            self._timer = threading.Timer(self.grace_s, self._hard_exit,
                                          args=(f"grace period of {self.grace_s}s over",))
            self._timer.daemon = True
            self._timer.start()

    def _hard_exit(self, why: str) -> None:
        log.error("Exiting now (%s) with status %d; resume uses the newest complete checkpoint.", why, self.exit_code)
        self._exit_fn(self.exit_code)

    def request(self) -> None:
        """Ask for a stop as if a signal had arrived (tests, or a time budget in the trainer)."""
        if not self.requested:
            self.requested = True
            self.requested_at = time.monotonic()

    # ---------------------------------------------------------------- agreement
    def should_stop(self, group: object = None) -> bool:
        """True on every rank when any rank was signalled. A collective: call it on all ranks at the
        same step boundary."""
        from llmscale.dist import any_rank

        stop = any_rank(self.requested, group)
        if stop and not self.requested:
            self.request()
        return stop


GRACE_ENV = "LLMSCALE_PREEMPT_GRACE_S"


def grace_from_env(env: Optional[dict] = None) -> Optional[float]:
    """The hard deadline after the first signal, from ``LLMSCALE_PREEMPT_GRACE_S`` (seconds; unset = none),
    e.g. a little less than SLURM's ``--signal=USR1@SECONDS``. A value that is not a positive number is
    refused with the fix."""
    raw = (os.environ if env is None else env).get(GRACE_ENV)
    if raw is None or raw.strip() == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0:
        from llmscale.errors import ConfigError

        raise ConfigError(f"{GRACE_ENV}={raw!r} is not a positive number of seconds; set it to e.g. 100 (a little "
                          f"less than the scheduler's warning time) or unset it for no hard deadline.")
    return value


def exit_code_for(stopped: bool) -> int:
    """The process exit status for a run that ``stopped`` early on a signal (EXIT_REQUEUE) or finished (0)."""
    return EXIT_REQUEUE if stopped else 0
