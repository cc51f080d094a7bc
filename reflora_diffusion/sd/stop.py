"""Stopping a training run from outside: SIGTERM (the app's Cancel, a scheduler, `kill`) ends it after the current
step with a checkpoint; a second SIGTERM, or a step that does not end within the grace period, ends it at once."""

from __future__ import annotations

import contextlib
import os
import signal
import threading

STOP_GRACE_S = 60.0  # after a SIGTERM, how long the current step may take before the trainer ends anyway


class StopRequest(threading.Event):
    """Set by the first SIGTERM: the loop stops after the current step, with a checkpoint. A second SIGTERM
    interrupts at once; a step that does not end within `grace` seconds is ended by the watchdog."""

    def __init__(self):
        super().__init__()
        self.watchdog: threading.Timer | None = None


@contextlib.contextmanager
def stop_on_sigterm(trainer):
    """Install the SIGTERM handler around a run (main thread only; a test calling train() from a thread skips it)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread (e.g. a test calling train())
        return
    grace = float(os.environ.get("REFLORA_STOP_GRACE_S", STOP_GRACE_S))

    def hard_stop():
        trainer.log.set_status(state="cancelled", error=f"stopped by SIGTERM: step {trainer.global_step + 1} did "
                                                        f"not end within {grace:g} s")
        os._exit(130)

    def on_sigterm(signum, frame):
        if trainer.stop.is_set():
            raise KeyboardInterrupt("stopped by a second SIGTERM")
        trainer.stop.set()
        trainer.stop.watchdog = threading.Timer(grace, hard_stop)
        trainer.stop.watchdog.daemon = True
        trainer.stop.watchdog.start()

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    _die_with_launcher()
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        if trainer.stop.watchdog is not None:
            trainer.stop.watchdog.cancel()


def _die_with_launcher() -> None:
    """`accelerate launch` (one process) runs the trainer as a child and does not pass SIGTERM on: ask the
    kernel for a SIGTERM when that launcher dies, so stopping the launcher stops the trainer (Linux)."""
    try:
        import ctypes

        import psutil

        parent = psutil.Process().parent()
        if parent is None or not any("accelerate" in part for part in parent.cmdline()[:3]):
            return
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent.pid:  # the launcher died before the request took effect
            os.kill(os.getpid(), signal.SIGTERM)
    except Exception:  # noqa: BLE001 - not Linux, no psutil: the launcher's SIGTERM stays the only path
        pass
