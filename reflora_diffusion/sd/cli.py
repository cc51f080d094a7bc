"""Command line of the SD trainer: flags / config file -> train(); user errors as one line, exit code 2;
Ctrl-C / SIGTERM exit 130 with the run marked cancelled."""

from __future__ import annotations

import os
import sys


def main(argv: list[str] | None = None) -> int:
    from .config import ConfigError, parse_args
    from .data import DataError
    from reflora_diffusion.rundir import RunDirError
    from .train import TrainingError, disk_full, train

    from reflora_diffusion.logs import show_info

    show_info()
    cfg = None
    try:
        cfg = parse_args(argv)
        run_dir = train(cfg)
    except (ConfigError, DataError, TrainingError, RunDirError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (see train.StopRequest): status "cancelled"
        print(f"interrupted: {e}" if str(e) else "interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if not disk_full(e):
            raise
        folder = cfg.output_dir if cfg is not None else "the output folder"
        print(f"error: no space left on the disk of {folder!r}; free space, then continue with "
              "--resume_from_checkpoint latest", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:  # one line for the whole job, not one per process
        print(f"done: {run_dir}")
    return 0
