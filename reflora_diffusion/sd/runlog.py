"""status.json and events.jsonl of a run folder (the format the app reads; see DESIGN.md).

Only the main process writes. status.json is replaced atomically; events.jsonl is appended line by line
and flushed, so a reader never sees a half-written object.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path


def _clean(obj):
    """JSON-safe: NaN/inf become null (json.dumps would write invalid NaN tokens)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


class RunLog:
    def __init__(self, run_dir: str | os.PathLike, max_steps: int, enabled: bool = True):
        self.dir = Path(run_dir)
        self.enabled = enabled
        self.status = {"state": "running", "step": 0, "max_steps": max_steps, "started_at": time.time(),
                       "updated_at": time.time(), "error": None, "pid": os.getpid()}

    def set_status(self, **fields) -> None:
        if not self.enabled:
            return
        self.status.update(fields, updated_at=time.time())
        tmp = self.dir / f".status.json.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(_clean(self.status)))
        os.replace(tmp, self.dir / "status.json")

    def event(self, **fields) -> None:
        if not self.enabled:
            return
        with open(self.dir / "events.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(_clean(fields)) + "\n")

    def truncate_after(self, step: int) -> None:
        """On resume: drop events the interrupted run logged after the checkpoint it resumes from."""
        path = self.dir / "events.jsonl"
        if not self.enabled or not path.is_file():
            return
        keep = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except ValueError:
                continue  # a line cut by a crash
        tmp = path.with_name(f".events.jsonl.{os.getpid()}.tmp")
        tmp.write_text("".join(k + "\n" for k in keep), encoding="utf-8")
        os.replace(tmp, path)


def read_events(run_dir: str | os.PathLike) -> list[dict]:
    path = Path(run_dir) / "events.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
