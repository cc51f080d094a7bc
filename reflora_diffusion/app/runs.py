"""Read run folders for the app: those of `train/sd.py` (whoever started it) and of the LLM trainers
(`train/glue.py`, `train/commonsense.py` train and eval), told apart by their config.json keys.

Everything the app shows or serves goes through `safe_path`, so a run name or a file parameter can
never point outside the runs directory. Reading never changes a run folder; a "running" run whose
process is gone is *reported* as failed here and *marked* failed by the job runner that owns it.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from reflora_diffusion.rundir import pid_alive, read_json

STATES = ("queued", "running", "done", "failed", "cancelled")
ACTIVE_STATES = ("queued", "running")
_NAME_OK = re.compile(r"[^A-Za-z0-9._-]+")
MAX_NAME_LEN = 64


class RunPathError(ValueError):
    """A run name or file parameter that would leave the runs directory."""


def sanitize_run_name(name: str) -> str:
    """A run name that is a single safe folder name: letters, digits, '.', '_', '-'."""
    # no leading '.' or '_': those folders are hidden from the run list (the app's own _compare lives there)
    cleaned = _NAME_OK.sub("-", (name or "").strip()).strip("-._")[:MAX_NAME_LEN].strip("-._")
    if not cleaned:
        raise ValueError(f"run name {name!r} has no usable characters; use letters, digits, '-', '_' or '.'")
    return cleaned


def safe_path(runs_dir: str | os.PathLike, *parts: str | os.PathLike) -> Path:
    """`runs_dir/parts...` resolved (symlinks too); raises RunPathError if it is not inside runs_dir."""
    root = Path(runs_dir).resolve()
    for part in parts:
        if part is None or str(part) == "" or "\x00" in str(part):
            raise RunPathError(f"invalid path component {part!r}")
    target = root.joinpath(*[str(p) for p in parts]).resolve()
    if target != root and root not in target.parents:
        raise RunPathError(f"{os.path.join(*map(str, parts))!r} is outside the runs directory")
    return target


# --------------------------------------------------------------------------- events


@dataclass
class EventLog:
    """events.jsonl read incrementally: each call to `update` parses only the newly appended lines.

    A resumed run appends steps it already logged before; the later value wins (`by_step`).
    """

    path: Path
    offset: int = 0
    by_step: dict = field(default_factory=dict)  # step -> latest loss event
    samples: list = field(default_factory=list)  # sample events in file order
    eval_by_step: dict = field(default_factory=dict)  # step -> latest evaluation loss
    _inode: int | None = None

    def update(self) -> "EventLog":
        try:
            st = os.stat(self.path)
        except OSError:
            return self
        if st.st_ino != self._inode or st.st_size < self.offset:  # replaced or truncated: start over
            self.offset, self.by_step, self.samples, self._inode = 0, {}, [], st.st_ino
            self.eval_by_step = {}
        if st.st_size == self.offset:
            return self
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read(st.st_size - self.offset)
        end = chunk.rfind(b"\n") + 1  # keep a half-written last line for the next call
        for line in chunk[:end].splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if not isinstance(event, dict) or "step" not in event:
                continue
            if "samples" in event:
                self.samples.append(event)
            if isinstance(event.get("loss"), (int, float)):  # a NaN loss is logged as null: no point
                self.by_step[int(event["step"])] = event
            eval_loss = eval_loss_of(event)
            if eval_loss is not None:
                self.eval_by_step[int(event["step"])] = eval_loss
        self.offset += end
        return self

    @property
    def steps(self) -> list[int]:
        return sorted(self.by_step)

    @property
    def losses(self) -> list[float]:
        return [float(self.by_step[s]["loss"]) for s in self.steps]

    @property
    def last(self) -> dict | None:
        return self.by_step[max(self.by_step)] if self.by_step else None

    @property
    def eval_steps(self) -> list[int]:
        return sorted(self.eval_by_step)

    @property
    def eval_losses(self) -> list[float]:
        return [self.eval_by_step[s] for s in self.eval_steps]


def eval_loss_of(event: dict) -> float | None:
    """An event's evaluation loss: a top-level `eval_loss`, or `eval.eval_loss` (the LLM trainers' evaluations)."""
    value = event.get("eval_loss")
    if value is None and isinstance(event.get("eval"), dict):
        value = event["eval"].get("eval_loss")
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


_EVENT_LOGS: dict[Path, EventLog] = {}


def event_log(run_dir: Path) -> EventLog:
    """The cached incremental reader of a run's events.jsonl, brought up to date."""
    path = Path(run_dir) / "events.jsonl"
    log = _EVENT_LOGS.get(path)
    if log is None:
        log = _EVENT_LOGS[path] = EventLog(path)
    return log.update()


# --------------------------------------------------------------------------- runs


# What trained in a run folder, told apart by config.json's keys (each trainer writes its own options there):
# SD "sd" (train/sd.py), "glue" (train/glue.py), "commonsense" (train/commonsense.py train) and
# "commonsense-eval" (train/commonsense.py eval: a base model, maybe with an adapter, on test sets; no training).
TASK_NAMES = {"sd": "SD", "glue": "GLUE", "commonsense": "commonsense", "commonsense-eval": "commonsense eval"}


def run_kind(config: dict) -> str:
    if "task_name" in config:
        return "glue"
    if "train_file" in config:
        return "commonsense"
    if "dataset" in config and "model_name_or_path" in config:
        return "commonsense-eval"
    return "sd"


@dataclass
class Run:
    name: str
    path: Path
    state: str
    step: int
    max_steps: int
    method: str
    config: dict
    status: dict
    error: str | None = None
    eta_seconds: float | None = None
    kind: str = "sd"
    model: str = ""  # the base model (SD) or the language model (LLM runs)
    result: str = ""  # an LLM run's metric from results.json, e.g. "accuracy 0.9312"

    @property
    def progress(self) -> float:
        return min(1.0, self.step / self.max_steps) if self.max_steps else 0.0

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    @property
    def label(self) -> str:
        return f"{self.name} ({self.method})"

    @property
    def task(self) -> str:
        """What the run does, in a few words: 'SD', 'GLUE sst2', 'commonsense', 'commonsense eval'."""
        task = TASK_NAMES.get(self.kind, self.kind)
        return f"{task} {self.config['task_name']}" if self.kind == "glue" and self.config.get("task_name") else task

    @property
    def steps_text(self) -> str:
        """'40/100', or '' for a run that counts no steps (an evaluation)."""
        return f"{self.step}/{self.max_steps}" if self.max_steps else (str(self.step) if self.step else "")


def _method(kind: str, config: dict, runs_dir: Path) -> str:
    if kind != "commonsense-eval":
        return str(config.get("method", "?"))
    adapter = config.get("adapter")
    if not adapter:
        return "base model"  # evaluated without an adapter
    # the adapter is usually a train run beside it: its method is in its config.json (read inside runs_dir only)
    try:
        adapter_config = read_json(safe_path(runs_dir, Path(str(adapter)).name, "config.json"), {}) or {}
    except RunPathError:
        adapter_config = {}
    return str(adapter_config.get("method") or "adapter")


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "?"


def llm_result(kind: str, results: dict | None) -> str:
    """An LLM run's metric from its results.json, in a few words ('' before there is one)."""
    if not results:
        return ""
    if kind == "glue":
        metric, value, final = results.get("main_metric") or "metric", results.get("main_value"), results.get("final")
        if value is None and isinstance(final, dict):  # no evaluation during training: only the final one
            value = next((final[k] for k in (f"eval_matched_{metric}", f"eval_{metric}") if final.get(k) is not None),
                         None)
        if value is None:
            return ""
        at = f" (step {results['evals'][-1].get('step')})" if results.get("evals") and final is None else ""
        return f"{metric} {_fmt(value)}{at}"
    datasets = results.get("datasets") or {}
    if not datasets:
        train = results.get("train") or {}
        return f"train loss {_fmt(train['train_loss'])}" if train.get("train_loss") is not None else ""
    complete = {n: m for n, m in datasets.items() if m.get("complete")}
    parts = []
    if len(complete) > 1 and results.get("average") is not None:
        parts.append(f"accuracy {_fmt(results['average'])} (mean of {len(complete)} sets)")
    else:
        parts += [f"{n} accuracy {_fmt(m.get('accuracy'))}" for n, m in complete.items()]
    parts += [f"{n} {m.get('correct', '?')}/{m.get('total', '?')} so far" for n, m in datasets.items()
              if n not in complete]
    return "; ".join(parts)


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and ((path / "config.json").is_file() or (path / "status.json").is_file())


def effective_status(status: dict | None) -> dict:
    """status.json as the user should see it: a 'running' run whose process is gone has crashed."""
    status = dict(status or {"state": "queued"})
    if status.get("state") == "running" and status.get("pid") is not None and not pid_alive(status["pid"]):
        status["state"] = "failed"
        status["error"] = status.get("error") or (
            f"training process {status['pid']} is no longer running (it crashed or was killed); see train.log")
    return status


def eta_seconds(status: dict, log: EventLog) -> float | None:
    """Remaining steps times the median recent seconds per step (robust to the slow first steps)."""
    step, max_steps = int(status.get("step") or 0), int(status.get("max_steps") or 0)
    if status.get("state") != "running" or not max_steps or step >= max_steps:
        return None
    recent = [e["sec_per_step"] for e in (log.by_step[s] for s in log.steps[-20:])
              if isinstance(e.get("sec_per_step"), (int, float)) and e["sec_per_step"] > 0]
    if recent:
        per_step = statistics.median(recent)
    elif step and status.get("started_at") and status.get("updated_at"):
        per_step = (status["updated_at"] - status["started_at"]) / step
    else:
        return None
    return per_step * (max_steps - step)


def read_run(runs_dir, name: str) -> Run:
    path = safe_path(runs_dir, name)
    if not is_run_dir(path):
        raise FileNotFoundError(f"no run named {name!r} in {runs_dir}")
    config = read_json(path / "config.json", {}) or {}
    status = effective_status(read_json(path / "status.json"))
    log = event_log(path)
    kind = run_kind(config)
    step = int(status.get("step") or (log.steps[-1] if log.steps else 0))
    # SD: max_train_steps; the LLM trainers: the Trainer's max_steps (-1 = "from the epochs", 0 for an evaluation)
    max_steps = max(0, int(status.get("max_steps") or config.get("max_train_steps") or config.get("max_steps") or 0))
    model = config.get("pretrained_model_name_or_path") or config.get("model_name_or_path") or ""
    result = llm_result(kind, read_json(path / "results.json")) if kind != "sd" else ""
    return Run(name=path.name, path=path, state=status.get("state", "queued"), step=step, max_steps=max_steps,
               method=_method(kind, config, Path(runs_dir)), config=config, status=status, error=status.get("error"),
               eta_seconds=eta_seconds(status, log), kind=kind, model=str(model), result=result)


def list_runs(runs_dir) -> list[Run]:
    """Every run folder directly under runs_dir, newest first."""
    root = Path(runs_dir)
    if not root.is_dir():
        return []
    runs = []
    for child in root.iterdir():
        if child.name.startswith((".", "_")) or not is_run_dir(child):
            continue
        try:
            runs.append(read_run(root, child.name))
        except (OSError, RunPathError):  # e.g. a symlink pointing out of the runs dir
            continue
    return sorted(runs, key=lambda r: (r.status.get("updated_at") or _mtime(r.path)), reverse=True)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def balance_stats(runs_dir, name: str) -> dict:
    """The core's latest statistics (balance_mean, balance_max, refactored, ...) for a run."""
    last = event_log(safe_path(runs_dir, name)).last
    return dict(last.get("refactor") or {}) if last else {}


def loss_curve(runs_dir, name: str) -> tuple[list[int], list[float]]:
    log = event_log(safe_path(runs_dir, name))
    return log.steps, log.losses


def sample_steps(runs_dir, name: str) -> dict[int, list[Path]]:
    """step -> the saved validation sample files of that step that exist inside the run."""
    run_dir = safe_path(runs_dir, name)
    out: dict[int, list[Path]] = {}
    for event in event_log(run_dir).samples:
        files = []
        for rel in event.get("samples") or []:
            try:
                p = safe_path(run_dir, rel)
            except RunPathError:
                continue
            if p.is_file():
                files.append(p)
        if files:
            out[int(event["step"])] = files
    return out


def latest_samples(runs_dir, name: str) -> tuple[int | None, list[Path]]:
    steps = sample_steps(runs_dir, name)
    if not steps:
        return None, []
    step = max(steps)
    return step, steps[step]


def log_tail(runs_dir, name: str, lines: int = 40, max_bytes: int = 64_000) -> str:
    """The last lines of the run's train.log (progress-bar carriage returns folded)."""
    path = safe_path(runs_dir, name, "train.log")
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - max_bytes))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    rows = [row.rstrip("\r").rsplit("\r", 1)[-1] for row in text.rstrip("\n").split("\n")]  # tqdm redraws with \r
    return "\n".join(rows[-lines:])


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


SUMMARY_COLUMNS = ["run", "task", "model", "method", "state", "step", "ETA", "last loss", "result", "error"]


def summary_rows(runs: list[Run]) -> list[list]:
    """Rows for the runs table (SUMMARY_COLUMNS); the model by its last path part (hub ids are long)."""
    rows = []
    for r in runs:
        last = event_log(r.path).last
        loss = f"{last['loss']:.4f}" if last and isinstance(last.get("loss"), (int, float)) else ""
        model = r.model.rstrip("/").rsplit("/", 1)[-1]
        rows.append([r.name, r.task, model, r.method, r.state, r.steps_text, format_eta(r.eta_seconds), loss,
                     r.result, (r.error or "")[:200]])
    return rows
