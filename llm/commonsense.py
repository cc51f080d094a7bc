"""Moved to train/commonsense.py, next to the other trainers' entry points; this path still runs it (same flags)."""

import runpy
from pathlib import Path

if __name__ == "__main__":
    runpy.run_path(str(Path(__file__).resolve().parents[1] / "train" / "commonsense.py"), run_name="__main__")
