"""One way to report: a logger per module (accelerate's, main process only, once accelerate is set up; the
standard one before that), shown by the entry points at INFO level. Progress bars stay tqdm."""

from __future__ import annotations

import logging


def get_logger(name: str):
    """Call where the message is logged (cheap): accelerate's state may be set up only after import."""
    try:
        from accelerate.logging import get_logger as accelerate_logger
        from accelerate.state import PartialState

        if PartialState._shared_state:
            return accelerate_logger(name)
    except ImportError:  # the core alone needs no accelerate
        pass
    return logging.getLogger(name)


def show_info(level: int = logging.INFO) -> None:
    """For command-line entry points: this package's INFO messages on stderr, as plain lines."""
    logger = logging.getLogger("reflora_diffusion")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)
