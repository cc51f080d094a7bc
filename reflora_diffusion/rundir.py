"""The run folder, one owner for the SD trainer, the LLM trainers and the app (layout in docs/design.md):
config.json, status.json (its only writer: RunLog for a trainer, with a context manager that ends a run as
done / failed / cancelled, and start_status / update_status for the app), events.jsonl
(writer and reader), checkpoint listing, stale-temporary cleanup, and the checks that keep a new run from
destroying or mixing with the run already in a folder.

Only the main process writes. JSON files are replaced atomically; events.jsonl is appended line by line
and flushed, so a reader never sees a half-written object.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import threading
import time
from pathlib import Path

ADAPTER_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "pytorch_lora_weights_kohya.safetensors"
TRAINER_STATE = "trainer_state.safetensors"  # in every checkpoint-<N> folder of the SD trainer
# What a run writes at the top of its folder; --overwrite_output_dir removes these (each recognised by its
# content, see _ours) and nothing else.
RUN_FILES = ("config.json", "status.json", "events.jsonl", ADAPTER_FILE, "README.md", KOHYA_FILE)
RUN_FOLDERS = ("checkpoints", "samples", "logs")
# What the app writes into a run folder it made (uploaded images, its log of the trainer, downloads): a
# trainer never removes these, and they do not make a folder foreign.
APP_ENTRIES = ("data", "job.json", "train.log", "exports")
# Options that steer how a run is carried out, not what it learns: a rerun may change them.
RUN_CONTROL_KEYS = {"resume_from_checkpoint", "overwrite_output_dir", "base_model_folder", "report_to",
                    "logging_steps", "dataloader_num_workers", "max_train_steps", "num_train_epochs",
                    "checkpointing_steps", "checkpoints_total_limit", "validation_steps", "validation_prompt",
                    "num_validation_images", "validation_inference_steps", "eval_loss_every", "changed_on_resume"}
# Temporary names of interrupted atomic writes: ".status.json.<pid>.tmp", ".checkpoint-200.tmp", ...
_TEMP = re.compile(r"^(\..+\.tmp|tmp\w+\.tmp|.+\.json\.tmp)$")


class RunDirError(ValueError):
    """The output folder cannot take this run; the message is one line naming the folder and the fix."""


def write_json_atomic(path: str | os.PathLike, data) -> None:
    """JSON to a temporary name, then rename: a reader never sees half a file. NaN/inf become null."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        tmp.write_text(json.dumps(_clean(data), indent=2, default=str) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # (a full disk): never leave half a file behind
        raise


def read_json(path: str | os.PathLike, default=None):
    """A JSON file's contents, or `default` if it is missing or half-written."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return default


def _clean(obj):
    """JSON-safe: NaN/inf become null (json.dumps would write invalid NaN tokens)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


# --- status.json: this module is its only writer (trainers through RunLog, the app through the functions) ---
FINISHED_STATES = ("done", "failed", "cancelled")


def new_status(state: str = "running", max_steps: int | None = None, pid: int | None = None) -> dict:
    """A new run's status.json (its one schema): state is queued / running / done / failed / cancelled."""
    now = time.time()
    return {"state": state, "step": 0, "max_steps": max_steps, "started_at": None if state == "queued" else now,
            "updated_at": now, "error": None, "pid": pid}


@contextlib.contextmanager
def _status_lock(run_dir: Path):
    """One status.json writer at a time per run folder, across processes: flock on the folder itself (no lock
    file in the run). Where there is no flock (Windows, some network file systems) writes are only atomic."""
    try:
        import fcntl

        fd = os.open(run_dir, os.O_RDONLY)
    except (ImportError, OSError):
        yield
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def start_status(run_dir: str | os.PathLike, status: dict) -> dict:
    """A new run (or a new attempt of one: a restart, a resume) begins: its status replaces whatever the folder's
    said, a finished state included."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    status = {**status, "updated_at": time.time()}
    with _status_lock(run_dir):
        write_json_atomic(run_dir / "status.json", status)
    return status


def update_status(run_dir: str | os.PathLike, *, only_from: tuple | None = None, **fields) -> dict | None:
    """Change fields of the run's status.json; returns what was written, or None when nothing was.

    A finished state (done / failed / cancelled) is never replaced by a non-finished one: a late write (an app
    marking a run 'running' after its trainer already finished, a hung trainer after the app marked it
    cancelled) changes nothing. `only_from`: write only if the current state is one of these (None: no file)."""
    run_dir = Path(run_dir)
    with _status_lock(run_dir):
        old = read_json(run_dir / "status.json", {})
        old = old if isinstance(old, dict) else {}
        state = old.get("state")
        if only_from is not None and state not in only_from:
            return None
        if state in FINISHED_STATES and fields.get("state", state) not in FINISHED_STATES:
            return None
        status = {**old, **fields, "updated_at": time.time()}
        write_json_atomic(run_dir / "status.json", status)
    return status


class RunLog:
    """status.json and events.jsonl of one run; a no-op on processes other than the main one. Its first status
    write starts the run (replacing the folder's old status); later ones never undo a finished state."""

    def __init__(self, run_dir: str | os.PathLike, max_steps: int | None = None, enabled: bool = True):
        self.dir = Path(run_dir)
        self.enabled = enabled
        self.status = new_status("running", max_steps, pid=os.getpid())
        self._started = False

    def set_status(self, **fields) -> None:
        if not self.enabled:
            return
        self.status.update(fields)
        if not self._started:
            self.status, self._started = start_status(self.dir, self.status), True
        else:
            self.status = update_status(self.dir, **self.status) or self.status

    @contextlib.contextmanager
    def reporting(self):
        """status.json says how the block ended: "cancelled" on Ctrl-C / SIGTERM, "failed" with the error's
        first line otherwise (the exception goes on)."""
        try:
            yield self
        except KeyboardInterrupt as e:
            self._set_final(state="cancelled", error=str(e) or "interrupted")
            raise
        except BaseException as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            self._set_final(state="failed", error=f"{type(e).__name__}: {msg}")
            raise

    def _set_final(self, **fields) -> None:
        try:
            self.set_status(**fields)
        except OSError:  # e.g. the disk is full: the original error is the one to report
            pass

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


def checkpoint_dirs(run_dir: str | os.PathLike) -> list[Path]:
    """checkpoints/checkpoint-<N> folders, oldest first."""
    root = Path(run_dir) / "checkpoints"
    found = [p for p in root.glob("checkpoint-*") if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


# --- guarding a folder that already holds a run -----------------------------------------------------------
def _ancestors() -> set[int]:
    import psutil

    return {p.pid for p in psutil.Process().parents()} | {os.getpid()}


def pid_alive(pid) -> bool:
    """True if a process with this pid exists and is not a zombie."""
    import psutil

    try:
        return psutil.Process(int(pid)).status() != psutil.STATUS_ZOMBIE
    except (psutil.Error, TypeError, ValueError):
        return False


def holds_run(run_dir: Path) -> bool:
    """A trainer (or the app, for a queued job) has written its config or status here."""
    return _ours(run_dir / "config.json") or _ours(run_dir / "status.json")


def _ours(entry: Path) -> bool:
    """True if `entry` (a top-level entry of a run folder) is something a run of ours wrote, judged by its name
    and content, so that a user's own file or folder of the same name is never taken for ours."""
    name = entry.name
    if _TEMP.match(name):
        return True
    if name in ("config.json", "status.json"):
        data = read_json(entry)
        return isinstance(data, dict) and ({"method", "output_dir"} <= data.keys() if name == "config.json"
                                           else "state" in data)
    if name == "events.jsonl":
        return entry.is_file() and _is_event_log(entry)
    if name in (ADAPTER_FILE, KOHYA_FILE):
        from reflora_diffusion.export.factors import read_metadata

        try:
            return entry.is_file() and "reflora_info" in read_metadata(entry)
        except Exception:  # noqa: BLE001 - not a safetensors file: not ours
            return False
    if name == "README.md":
        from reflora_diffusion.export.run import CARD_MARK

        return entry.is_file() and CARD_MARK in entry.read_text(errors="replace")
    if name == "checkpoints":
        return entry.is_dir() and all(_TEMP.match(p.name) or (re.fullmatch(r"checkpoint-\d+", p.name) and
                                                                (p / TRAINER_STATE).is_file())
                                      for p in entry.iterdir())
    if name == "samples":
        return entry.is_dir() and all(
            _TEMP.match(p.name) or (p.is_file() and re.fullmatch(r"grid_step_\d+\.png", p.name))
            or (p.is_dir() and re.fullmatch(r"step_\d+", p.name)
                and all(re.fullmatch(r"\d+\.png", q.name) or _TEMP.match(q.name) for q in p.iterdir()))
            for p in entry.iterdir())
    if name == "logs":  # accelerate's trackers write logs/<project>/ (the trainer's project is "reflora-sd")
        return entry.is_dir() and all(p.name == "reflora-sd" for p in entry.iterdir())
    return False


def _is_event_log(path: Path) -> bool:
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for n, line in enumerate(lines):
        try:
            if not isinstance(json.loads(line), dict):
                return False
        except ValueError:
            if n < len(lines) - 1:  # only the last line may be cut (a crash mid-write)
                return False
    return True


def foreign_entries(run_dir: str | os.PathLike) -> list[str]:
    """Entries of a run folder that no run of ours (nor the app) wrote, as names relative to the folder."""
    run_dir = Path(run_dir)
    found = []
    for entry in sorted(run_dir.iterdir()):
        if entry.name in APP_ENTRIES or _ours(entry):
            continue
        if entry.is_dir() and entry.name in RUN_FOLDERS:  # name the first file of the user's inside it
            inner = sorted(str(p.relative_to(run_dir)) for p in entry.rglob("*") if p.is_file())
            found.append(inner[0] if inner else entry.name + "/")
        else:
            found.append(entry.name + ("/" if entry.is_dir() else ""))
    return found


def check_output_dir(run_dir: str | os.PathLike, config: dict, *, resume_found: bool) -> str:
    """Decide what a new trainer may do with `run_dir`; returns "new", "restart", "resume" or "overwrite".

    A folder holding a run with trained steps is never silently reused: it is resumed (a checkpoint exists
    and --resume_from_checkpoint asks for it) or replaced (--overwrite_output_dir, which removes only what a
    run of ours wrote and refuses a folder holding anything else). A run that never trained a step (the app's
    queued run, a set-up error) is simply started again; so is the same unfinished job with nothing to
    resume (a crash before the first checkpoint). Nothing is written here: a refusal leaves the folder as it was.
    """
    run_dir = Path(run_dir)
    if not run_dir.exists():
        return "new"
    if not run_dir.is_dir():
        raise RunDirError(f"--output_dir {str(run_dir)!r} is a file; give a folder")
    status = read_json(run_dir / "status.json") or {}
    pid = status.get("pid")
    if status.get("state") == "running" and pid_alive(pid) and int(pid) not in _ancestors():
        raise RunDirError(f"--output_dir {str(run_dir)!r} is in use by a running trainer (pid {pid}); wait for it, "
                          "cancel it, or choose another --output_dir")
    if config.get("overwrite_output_dir"):
        foreign = foreign_entries(run_dir)
        if foreign:
            raise RunDirError(f"--overwrite_output_dir: {str(run_dir)!r} holds {foreign[0]!r}, which no run of this "
                              "trainer wrote; it only replaces its own files: move that out, or choose another "
                              "--output_dir")
        return "overwrite"
    if resume_found:
        check_resume(run_dir, config)
        return "resume"
    entries = [p for p in run_dir.iterdir() if not _TEMP.match(p.name)]
    if not entries:
        return "new"
    if not holds_run(run_dir):
        raise RunDirError(f"--output_dir {str(run_dir)!r} is not empty and holds no run of this trainer; choose a new "
                          "or empty folder")
    old = read_json(run_dir / "config.json") or {}
    what = (f"a {old.get('method', '?')} run (rank {old.get('rank', '?')}, {status.get('state', 'unknown')} at "
            f"step {status.get('step', '?')})")
    finished = status.get("state") == "done" or (run_dir / ADAPTER_FILE).is_file()
    has_checkpoints = any((run_dir / "checkpoints").glob("checkpoint-*"))
    trained = finished or has_checkpoints or (status.get("step") or 0) > 0
    if trained and config.get("resume_from_checkpoint"):
        raise RunDirError(f"--resume_from_checkpoint: {str(run_dir)!r} holds {what} but no checkpoint to resume "
                          "(its files are kept); pass --overwrite_output_dir to train it again from step 0")
    if finished or has_checkpoints or (trained and _differs(old, config)):
        raise RunDirError(f"--output_dir {str(run_dir)!r} already holds {what}; resume it with "
                          "--resume_from_checkpoint latest, replace it with --overwrite_output_dir, or choose "
                          "another --output_dir")
    return "restart"


# Options that fix what a checkpoint is (its base, its LoRA shapes, its method state): a resume must keep them.
STRUCTURAL_KEYS = ("pretrained_model_name_or_path", "revision", "variant", "method", "rank", "lora_alpha",
                   "target_modules", "lora_conv", "train_text_encoder", "text_encoder_target_modules", "optimizer")


def check_resume(run_dir: Path, config: dict) -> None:
    """Refuse (touching nothing) a resume whose options change what the checkpoint is."""
    old = read_json(run_dir / "config.json")
    if not isinstance(old, dict):
        return
    for key in STRUCTURAL_KEYS:
        if key in old and key in config and old[key] != config[key]:
            raise RunDirError(f"--resume_from_checkpoint: the run in {str(run_dir)!r} was trained with --{key} "
                              f"{_show(old[key])}, not {_show(config[key])}; resume with the same --{key}, or "
                              "start a new run in another --output_dir")


def resume_changes(old: dict, new: dict) -> dict:
    """{option: [before, after]} for the options that affect training and differ on a resume (the data, the
    prompt, the learning rate, the seed, ...); the trainer records them in config.json and the model card."""
    keys = sorted((set(old) | set(new)) - RUN_CONTROL_KEYS - set(STRUCTURAL_KEYS) - {"output_dir"})
    return {k: [old.get(k), new.get(k)] for k in keys
            if old.get(k) != new.get(k) and not (k in _FILLED_IN and new.get(k) is None)}


def _show(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


# Options the trainer fills in when left unset (a drawn seed, the model's native resolution): unset on
# either side is no difference.
_FILLED_IN = {"seed", "resolution", "refactor_warmup_steps", "min_bucket_reso", "max_bucket_reso",
              "bucket_reso_steps"}


def _differs(old: dict, new: dict) -> bool:
    keys = (set(old) | set(new)) - RUN_CONTROL_KEYS
    return any(old.get(k) != new.get(k) for k in keys
               if not (k in _FILLED_IN and (old.get(k) is None or new.get(k) is None)))


def clear_run(run_dir: Path) -> None:
    """Remove what a run wrote (--overwrite_output_dir; check_output_dir has refused a folder holding anything
    else); each entry is recognised as ours again before it goes. config.json and status.json are replaced
    (atomically) by the new run right after, never removed: a reader such as the app always finds a run there."""
    for name in RUN_FILES + RUN_FOLDERS:
        entry = run_dir / name
        if name in ("config.json", "status.json") or not entry.exists() or not _ours(entry):
            continue
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def start_fresh(run_dir: str | os.PathLike, keep_events: bool = False) -> None:
    """An LLM run that does not resume: the folder's old status, results (and events) go, the rest stays."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in ("status.json", "results.json") + (() if keep_events else ("events.jsonl",)):
        (run_dir / name).unlink(missing_ok=True)


def clean_stale_temps(run_dir: Path) -> list[str]:
    """Delete temporary files and folders left by writes that were killed midway; returns their names."""
    removed = []
    for folder in (run_dir, run_dir / "checkpoints"):
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            if _TEMP.match(entry.name):
                shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
                removed.append(entry.name)
    return removed
