"""Command line of the SD trainer: flags / config file -> train(); user errors as one line, exit code 2."""

from __future__ import annotations

import signal
import sys


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM (the app's cancel, a scheduler) ends like Ctrl-C: status "cancelled"


def main(argv: list[str] | None = None) -> int:
    from .config import ConfigError, parse_args
    from .data import DataError
    from .train import TrainingError, train

    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        cfg = parse_args(argv)
        run_dir = train(cfg)
    except (ConfigError, DataError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"done: {run_dir}")
    return 0
