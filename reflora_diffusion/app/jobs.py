"""Start, queue, watch and cancel SD training jobs as separate processes.

A job is an ordinary run folder plus the command a user would type:
    accelerate launch train/sd.py --config <run>/config.json
so a run started here is indistinguishable from one started in a terminal, and survives an app
restart (the process runs in its own session; the folder is the only state). The runner only adds
`job.json` (the command and process group, so a later app can cancel it) and marks the end state in
status.json when the trainer could not (crash, kill, cancel), through the run-folder module like the trainer.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..cpu import threads_per_process
from reflora_diffusion.rundir import (FINISHED_STATES, new_status, pid_alive, read_json, start_status, update_status,
                                      write_json_atomic)

from .runs import effective_status, is_run_dir, safe_path, sanitize_run_name

REPO_ROOT = Path(__file__).resolve().parents[2]
TRAIN_SCRIPT = "train/sd.py"
IMAGE_FORMATS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp"}
MAX_UPLOAD_BYTES = 20 * 1024 * 1024
MAX_UPLOAD_FILES = 500
MAX_UPLOAD_TOTAL_BYTES = 1024 * 1024 * 1024  # per run
# The queue: runs waiting for a place, and the bytes of the uploads they copied (each run copies its own)
MAX_QUEUED_RUNS = 16
MAX_QUEUED_UPLOAD_BYTES = 4 * 1024 * 1024 * 1024
CANCEL_GRACE_SECONDS = 10.0
# what the app accepts (the trainer accepts more from a terminal): field -> (allowed range, check)
FORM_LIMITS = {
    "max_train_steps": ("1..100000", lambda x: 1 <= x <= 100_000),
    "num_train_epochs": ("1..1000", lambda x: 1 <= x <= 1000),
    "rank": ("1..256", lambda x: 1 <= x <= 256),
    "resolution": ("64..2048, a multiple of 8", lambda x: 64 <= x <= 2048 and x % 8 == 0),
    "learning_rate": ("(0, 1]", lambda x: 0 < x <= 1),
    "num_validation_images": ("1..16", lambda x: 1 <= x <= 16),
}


class JobError(ValueError):
    """Bad form input; the message is shown to the user as is."""


# --------------------------------------------------------------------------- uploads


def check_image(path: str | os.PathLike, max_bytes: int = MAX_UPLOAD_BYTES) -> str:
    """The image format of an uploaded file; JobError if it is too big, not an image, or corrupt."""
    name = Path(path).name
    size = os.path.getsize(path)
    if size > max_bytes:
        raise JobError(f"upload {name!r} is {size / 2**20:.1f} MB; the limit is {max_bytes / 2**20:.0f} MB per image")
    try:
        with Image.open(path) as im:
            fmt = im.format
            im.verify()  # reads the whole file: catches truncated/corrupt data, not only the header
        with Image.open(path) as im:
            im.load()
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as e:
        raise JobError(f"upload {name!r} is not a readable image ({e}); use JPEG, PNG, WEBP or BMP files") from None
    if fmt not in IMAGE_FORMATS:
        raise JobError(f"upload {name!r} is a {fmt} image; use JPEG, PNG, WEBP or BMP files")
    return fmt


def upload_paths(files) -> list[str]:
    return [os.fspath(f) if isinstance(f, (str, os.PathLike)) else f.name for f in files or []]  # paths or tempfiles


def save_uploads(files, dest: Path, max_bytes: int = MAX_UPLOAD_BYTES, max_files: int = MAX_UPLOAD_FILES) -> Path:
    """Check every upload first, then copy them into `dest` under safe names (nothing copied on error)."""
    files = upload_paths(files)
    if len(files) > max_files:
        raise JobError(f"{len(files)} images uploaded; the limit is {max_files}")
    total = sum(os.path.getsize(f) for f in files)
    if total > MAX_UPLOAD_TOTAL_BYTES:
        raise JobError(f"the uploads add up to {total / 2**20:.0f} MB; the limit is "
                       f"{MAX_UPLOAD_TOTAL_BYTES / 2**20:.0f} MB: give a folder on this machine instead")
    formats = [check_image(f, max_bytes) for f in files]
    dest.mkdir(parents=True, exist_ok=True)
    for i, (f, fmt) in enumerate(zip(files, formats)):
        stem = re.sub(r"[^A-Za-z0-9_-]+", "-", Path(f).stem)[:40] or "image"
        shutil.copyfile(f, dest / f"{i:04d}-{stem}{IMAGE_FORMATS[fmt]}")
    return dest


# --------------------------------------------------------------------------- config


def check_limits(values: dict) -> None:
    """JobError naming the field and its allowed range when a form value is outside FORM_LIMITS
    (nan and inf included); values that are not numbers are left to the trainer's config check."""
    for key, (allowed, ok) in FORM_LIMITS.items():
        if key not in values:
            continue
        try:
            x = float(values[key])
        except (TypeError, ValueError):
            continue
        if not (math.isfinite(x) and ok(x)):
            raise JobError(f"--{key} must be in {allowed} (got {values[key]})")


MISSING_DATA = "data folder {!r} does not exist; upload images or give a folder"
MISSING_EVAL = ("eval images folder {!r} does not exist; give a folder of held-out images, or leave it blank to take "
                "the training images")


def build_config(form: dict, run_dir: Path, data_dir: Path | None = None) -> dict:
    """config.json for train/sd.py from the form (same keys as its CLI flags; empty fields left out),
    resolved and checked by the trainer's own config code, so a bad field fails here, in the form."""
    from reflora_diffusion.sd.config import ConfigError, make_config

    values = {k: v for k, v in form.items() if v is not None and v != "" and v != []}
    check_limits(values)
    if isinstance(values.get("validation_prompt"), str):  # one prompt per line in the form
        values["validation_prompt"] = [p.strip() for p in values["validation_prompt"].splitlines() if p.strip()]
    if data_dir is not None:  # uploads win over a folder: DreamBooth images with the instance prompt
        values.pop("train_data_dir", None)
        values["instance_data_dir"] = str(data_dir)
    for key, missing in (("instance_data_dir", MISSING_DATA), ("train_data_dir", MISSING_DATA),
                         ("class_data_dir", None),  # class images may still be generated
                         ("eval_data_dir", MISSING_EVAL)):
        if values.get(key):
            folder = Path(values[key]).expanduser().resolve()
            if not folder.is_dir() and missing:
                raise JobError(missing.format(values[key]))
            values[key] = str(folder)
    if not values.get("instance_data_dir") and not values.get("train_data_dir"):
        raise JobError("no training images: upload some images or give a data folder")
    if values.get("with_prior_preservation") and not values.get("class_data_dir"):
        values["class_data_dir"] = str(run_dir / "class_images")  # the trainer generates missing class images
    values["output_dir"] = str(run_dir)
    try:
        return make_config(values).to_dict()
    except ConfigError as e:
        raise JobError(str(e)) from None


# --------------------------------------------------------------------------- the runner


def train_command(config_path: Path) -> list[str]:
    """`accelerate launch train/sd.py --config ...` with this interpreter's accelerate; plain python without it."""
    accelerate = Path(sys.executable).with_name("accelerate")
    if accelerate.is_file() and os.access(accelerate, os.X_OK):
        return [str(accelerate), "launch", TRAIN_SCRIPT, "--config", str(config_path)]
    return [sys.executable, TRAIN_SCRIPT, "--config", str(config_path)]


def cuda_devices() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # no torch / broken driver: no GPU to share out
        return 0


# `accelerate launch` reports a failed trainer with its own traceback, ending in this line: never the reason why,
# but it carries the trainer's exit code (2: a user error, reported by the trainer as one `error: ...` line)
_LAUNCHER_LINE = re.compile(r"^subprocess\.CalledProcessError: Command .* (?:returned non-zero exit status (-?\d+)"
                            r"|died with <Signals\.(\w+): (\d+)>)")
_ERROR_LINE = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception|Interrupt)\b|error:|Error:|RuntimeError)")


def last_error(log_text: str) -> tuple[str | None, int | None]:
    """Why the last launch in a log died, and the trainer's exit code if the launcher reported it: the trainer's
    last exception or `error:` line (a signal that killed it, if so), not the launcher's CalledProcessError."""
    lines = [ln.strip() for ln in log_text.splitlines()]
    starts = [i for i, ln in enumerate(lines) if ln.startswith("$ ")]  # the runner's line before each launch
    lines = [ln for ln in lines[starts[-1] + 1 if starts else 0:] if ln]
    code, signal_name, rest = None, None, []
    for ln in lines:
        m = _LAUNCHER_LINE.match(ln)
        if m:
            code, signal_name = (int(m[1]), None) if m[1] else (-int(m[3]), m[2])
        else:
            rest.append(ln)
    if signal_name:
        return f"the trainer was killed by {signal_name}", code
    reason = next((ln for ln in reversed(rest) if _ERROR_LINE.match(ln)), rest[-1] if rest else None)
    return (reason[:500] if reason else None), code


class JobRunner:
    """Launches training processes for run folders under `runs_dir`; thread-safe, one per app.

    Every job goes through one queue: at most `max_concurrent` run at once (default: one per CUDA GPU,
    one on a CPU), each with OMP_NUM_THREADS = cores // max_concurrent unless the app's environment sets
    it, and on a GPU machine with CUDA_VISIBLE_DEVICES set to the least busy GPU (unless the app's
    environment sets that). At most `max_queued` runs wait, holding at most `max_queued_upload_bytes` of
    uploads; a start beyond either is refused before anything is copied."""

    def __init__(self, runs_dir, repo_root: Path = REPO_ROOT, command=train_command, adopt: bool = True,
                 max_concurrent: int | None = None, max_queued: int = MAX_QUEUED_RUNS,
                 max_queued_upload_bytes: int = MAX_QUEUED_UPLOAD_BYTES):
        self.runs_dir = Path(runs_dir).resolve()
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.repo_root = Path(repo_root)
        self.command = command
        self.gpus = cuda_devices()
        self.max_concurrent = max(1, int(max_concurrent or self.gpus or 1))
        self.max_queued, self.max_queued_upload_bytes = max_queued, max_queued_upload_bytes
        self._lock = threading.RLock()  # held across "still queued? then launch" so a cancel cannot slip in
        self._procs: dict[Path, subprocess.Popen] = {}
        self._active: dict[Path, int | None] = {}  # jobs counted against max_concurrent (launched or adopted) -> GPU
        self._pending: deque[list[Path]] = deque()  # waiting chains: a chain's runs go one after the other
        self._after: dict[Path, list[Path]] = {}  # a running job -> the rest of its chain
        self._cancelled: set[Path] = set()
        self._upload_bytes: dict[Path, int] = {}  # a waiting run -> the bytes of its copied uploads
        self._admitting = [0, 0]  # runs (and their upload bytes) being created now, counted before they are copied
        if adopt:
            self.adopt()

    # ---- creating runs

    def new_run_dir(self, name: str) -> Path:
        """A fresh, unique run folder: os.mkdir is atomic, so two users asking at once get two runs."""
        base = sanitize_run_name(name)
        for i in range(1, 10_000):
            candidate = safe_path(self.runs_dir, base if i == 1 else f"{base}-{i}")
            try:
                candidate.mkdir()
                return candidate
            except FileExistsError:
                continue
        raise JobError(f"too many runs named {base!r}; choose another run name")

    def create_run(self, form: dict, name: str | None = None, images=(), data_dir: Path | None = None) -> Path:
        """Run folder with config.json and a 'queued' status.json; uploads copied into <run>/data."""
        name = name or f"{time.strftime('%Y%m%d-%H%M%S')}-{form.get('method', 'run')}"
        run_dir = self.new_run_dir(name)
        try:
            if images:
                data_dir = save_uploads(images, run_dir / "data")
            config = build_config(form, run_dir, data_dir)
            write_json_atomic(run_dir / "config.json", config)
            start_status(run_dir, new_status("queued", int(config.get("max_train_steps") or 0)))
        except Exception:
            shutil.rmtree(run_dir, ignore_errors=True)  # bad form: leave no half-made run behind
            raise
        return run_dir

    def start(self, form: dict, name: str | None = None, images=()) -> Path:
        """Create a run and queue it: it starts now if fewer than max_concurrent jobs are running."""
        with self._admit(1, images):
            run_dir = self.create_run(form, name, images)
            self.enqueue(run_dir)
        return run_dir

    def _waiting(self) -> list[Path]:
        with self._lock:
            chains = [*self._pending, *self._after.values()]
            return [d for chain in chains for d in chain if d not in self._cancelled]

    @contextlib.contextmanager
    def _admit(self, runs: int, images):
        """Hold places in the queue for `runs` new runs, each copying `images`, while they are created and queued;
        JobError (one line) if the queue is full or its uploads would pass the limit."""
        size = runs * sum(os.path.getsize(f) for f in upload_paths(images))
        with self._lock:
            waiting = self._waiting()
            queued = len(waiting) + self._admitting[0]
            held = sum(self._upload_bytes.get(d, 0) for d in waiting) + self._admitting[1]
            if queued + runs > self.max_queued:
                room = max(0, self.max_queued - queued)
                what = f"has room for {room} more run{'s' if room > 1 else ''}, not {runs}" if room else "is full"
                raise JobError(f"the job queue {what} ({queued} waiting, the limit is {self.max_queued}); start "
                               "again when some have started, or cancel a queued run")
            if size and held + size > self.max_queued_upload_bytes:
                raise JobError(f"the queued runs' uploads would add up to {(held + size) / 2**20:.0f} MB (the limit is "
                               f"{self.max_queued_upload_bytes / 2**20:.0f} MB); start again when some have started, "
                               "cancel a queued run, or give a folder on this machine instead of uploading")
            self._admitting[0] += runs
            self._admitting[1] += size
        try:
            yield
        finally:
            with self._lock:
                self._admitting[0] -= runs
                self._admitting[1] -= size

    def start_ab(self, form: dict, methods=("lora", "reflora"), name: str | None = None, images=(),
                 side_by_side: bool = False) -> list[Path]:
        """Runs that differ only in `method` (same data, seed, settings), queued to run one after the other
        (the default: fair timings) or side by side, i.e. at once as far as max_concurrent allows."""
        methods = [m for m in methods if m]
        if len(methods) < 2 or len(set(methods)) != len(methods):
            raise JobError(f"A/B needs two or more different methods, got {methods}")
        base = name or f"{time.strftime('%Y%m%d-%H%M%S')}-ab"
        if form.get("seed") in (None, ""):  # the trainer would draw one per run: the runs must share it
            form = {**form, "seed": random.randint(0, 2**31 - 1)}
        run_dirs = []
        with self._admit(len(methods), images):
            try:
                for method in methods:  # each run gets its own copy of the uploads: run folders stand alone
                    run_dirs.append(self.create_run({**form, "method": method}, f"{base}-{method}", images))
            except Exception:
                for d in run_dirs:
                    shutil.rmtree(d, ignore_errors=True)
                raise
            if side_by_side:
                for run_dir in run_dirs:
                    self.enqueue(run_dir)
            else:
                self.enqueue(*run_dirs)
        return run_dirs

    # ---- processes

    def launch(self, run_dir: Path) -> subprocess.Popen:
        run_dir = Path(run_dir)
        cmd = self.command(run_dir / "config.json")
        env = {**os.environ, "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(self.repo_root), os.environ.get("PYTHONPATH")]))}
        env.setdefault("OMP_NUM_THREADS", str(threads_per_process(self.max_concurrent)))  # its share of the cores
        gpu = None
        if self.gpus and "CUDA_VISIBLE_DEVICES" not in os.environ:
            with self._lock:
                busy = list(self._active.values())
                gpu = min(range(self.gpus), key=busy.count)
            env["CUDA_VISIBLE_DEVICES"] = str(gpu)
        # Mark it running before the trainer exists, never after: from its first write on, status.json is the
        # trainer's (and the writer refuses to turn a fast run's 'done' back into 'running' anyway).
        update_status(run_dir, only_from=("queued",), state="running", pid=None, started_at=time.time())
        with open(run_dir / "train.log", "ab") as log:
            log.write(f"$ {shlex.join(cmd)}\n".encode())
            log.flush()
            # own session: a cancel kills the whole group (accelerate + trainer); an app restart doesn't
            try:
                proc = subprocess.Popen(cmd, cwd=self.repo_root, stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env=env, start_new_session=True)
            except OSError as e:
                self._mark(run_dir, "failed", f"could not start {cmd[0]}: {e}")
                raise JobError(f"could not start the trainer ({cmd[0]}): {e}") from None
        write_json_atomic(run_dir / "job.json", {"command": cmd, "cwd": str(self.repo_root), "pgid": proc.pid,
                                                 "gpu": gpu, "launched_at": time.time()})
        with self._lock:
            self._procs[run_dir] = proc
            self._active[run_dir] = gpu
        threading.Thread(target=self._watch, args=(run_dir, proc), daemon=True).start()
        return proc

    def _watch(self, run_dir: Path, proc: subprocess.Popen) -> None:
        returncode = proc.wait()
        # the launcher is gone; its trainer child may still be writing its last status (e.g. after SIGTERM)
        _wait_dead(_trainer_pid(run_dir), timeout=CANCEL_GRACE_SECONDS)
        self._finalize(run_dir, returncode)
        self._ended(run_dir)

    def _ended(self, run_dir: Path) -> None:
        """A job is gone: free its place, put the rest of its chain first in line, start what fits."""
        with self._lock:
            self._procs.pop(run_dir, None)
            self._active.pop(run_dir, None)
            rest = self._after.pop(run_dir, None)
            if rest:
                self._pending.appendleft(rest)
            self._dispatch()

    def _finalize(self, run_dir: Path, returncode: int | None) -> None:
        """After the process is gone: make status.json say how the run ended if the trainer didn't."""
        with self._lock:
            state = (read_json(run_dir / "status.json", {}) or {}).get("state")
            if run_dir in self._cancelled:
                self._mark(run_dir, "cancelled", "cancelled by the user")
            elif state in FINISHED_STATES and not (state == "done" and returncode not in (0, None)):
                return
            else:  # the trainer did not say how it ended (or said done, then its process failed)
                log = ""
                try:
                    log = (run_dir / "train.log").read_text(errors="replace")[-20_000:]
                except OSError:
                    pass
                reason, code = last_error(log) if returncode != 0 else ("the trainer exited without finishing", None)
                update_status(run_dir, only_from=(state,), state="failed",
                              error=f"{reason or 'process died'} (exit code {code or returncode}); see train.log")

    def enqueue(self, *run_dirs: Path) -> None:
        """Queue runs to go one after the other (usually one run). Queued runs start in order as places
        free up, at most max_concurrent at once."""
        with self._lock:
            for d in run_dirs:
                self._upload_bytes[Path(d)] = _folder_bytes(Path(d) / "data")
            self._pending.append([Path(d) for d in run_dirs])
            self._dispatch()

    def _dispatch(self) -> None:
        with self._lock:
            while self._pending and len(self._active) < self.max_concurrent:
                run_dir, *rest = self._pending.popleft()
                started = self._launch_queued(run_dir)
                if rest and started:
                    self._after[run_dir] = rest
                elif rest:  # cancelled or could not start: the next of its chain takes its turn
                    self._pending.appendleft(rest)

    def _launch_queued(self, run_dir: Path) -> bool:
        """Launch a queued run unless it was cancelled while it waited; False if it did not start."""
        with self._lock:
            self._upload_bytes.pop(run_dir, None)  # it leaves the queue
            if run_dir in self._cancelled or (read_json(run_dir / "status.json", {}) or {}).get("state") != "queued":
                return False
            try:
                self.launch(run_dir)
            except JobError:  # marked failed by launch
                return False
            return True

    def is_running(self, run_dir: Path) -> bool:
        with self._lock:
            return Path(run_dir) in self._procs

    def _mark(self, run_dir: Path, state: str, error: str | None) -> None:
        update_status(run_dir, state=state, error=error)

    def cancel(self, name: str, grace: float = CANCEL_GRACE_SECONDS) -> str:
        """Stop a queued or running job; its status.json ends as 'cancelled'. Returns a message."""
        run_dir = safe_path(self.runs_dir, name)
        if not is_run_dir(run_dir):
            raise JobError(f"no run named {name!r}")
        status = effective_status(read_json(run_dir / "status.json"))
        if status.get("state") not in ("queued", "running"):
            return f"{run_dir.name} is already {status.get('state')}"
        with self._lock:  # the queue worker checks _cancelled under this lock before launching
            self._cancelled.add(run_dir)
            proc = self._procs.get(run_dir)
            status = effective_status(read_json(run_dir / "status.json"))
            if status.get("state") == "queued" and proc is None:
                self._mark(run_dir, "cancelled", "cancelled by the user before it started")
                return f"cancelled {run_dir.name} (it had not started)"
        job = read_json(run_dir / "job.json", {}) or {}
        pid = _trainer_pid(run_dir) or (proc.pid if proc else None)
        pgid = proc.pid if proc else job.get("pgid")
        # the app's own jobs: the whole process group (launcher + trainer); a run started in a terminal:
        # only its trainer. SIGTERM first: the trainer then ends like Ctrl-C and writes its own status.
        _signal(pgid, pid, signal.SIGTERM)
        if not _wait_dead(pid, grace, proc):
            _signal(pgid, pid, signal.SIGKILL)
            _wait_dead(pid, 5.0, proc)
        if proc is not None:  # the watcher thread writes the final status; wait for it
            while self.is_running(run_dir):
                time.sleep(0.05)
        else:
            self._mark(run_dir, "cancelled", "cancelled by the user")
        return f"cancelled {run_dir.name} at step {status.get('step', 0)}"

    def adopt(self) -> None:
        """After an app restart: re-queue jobs that were waiting, mark jobs that died meanwhile,
        and watch jobs a previous app launched that are still running."""
        queued = []
        for run_dir in sorted(self.runs_dir.iterdir()):
            if run_dir.name.startswith((".", "_")) or not is_run_dir(run_dir):
                continue
            status = read_json(run_dir / "status.json", {}) or {}
            job = read_json(run_dir / "job.json")
            if status.get("state") == "queued" and job is None:
                queued.append((status.get("updated_at") or 0, run_dir))
            elif status.get("state") == "running" and job is None and status.get("pid") is None:
                self._mark(run_dir, "failed", "the app stopped while starting this run's trainer; start it again")
            elif status.get("state") == "running" and job is not None:
                pid = status.get("pid") or job.get("pgid")  # no pid yet: the trainer had not written its status
                if pid_alive(pid):
                    with self._lock:  # still one of this app's jobs: it keeps its place (and GPU)
                        self._active[run_dir] = job.get("gpu")
                    threading.Thread(target=self._watch_pid, args=(run_dir, pid), daemon=True).start()
                else:
                    self._finalize(run_dir, None)
        for _, run_dir in sorted(queued):
            self.enqueue(run_dir)

    def _watch_pid(self, run_dir: Path, pid: int) -> None:
        while pid_alive(pid):
            time.sleep(2.0)
        self._finalize(run_dir, None)
        self._ended(run_dir)

    def wait(self, run_dir: Path, timeout: float | None = None) -> str:
        """Block until the run is no longer queued/running; returns its final state."""
        deadline = None if timeout is None else time.time() + timeout
        while True:
            state = effective_status(read_json(Path(run_dir) / "status.json")).get("state")
            if state not in ("queued", "running") and not self.is_running(Path(run_dir)):
                return state
            if deadline is not None and time.time() > deadline:
                raise TimeoutError(f"{Path(run_dir).name} still {state} after {timeout} s")
            time.sleep(0.2)


def _folder_bytes(folder: Path) -> int:
    """The bytes of the files in a folder (a run's copied uploads); 0 if there is none."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def _trainer_pid(run_dir: Path):
    return (read_json(Path(run_dir) / "status.json", {}) or {}).get("pid")


def _wait_dead(pid, timeout: float, proc: subprocess.Popen | None = None) -> bool:
    """Wait until the trainer pid (and the launcher process, if given) have exited; False on timeout."""
    deadline = time.time() + timeout
    while (pid_alive(pid) if pid else False) or (proc is not None and proc.poll() is None):
        if time.time() > deadline:
            return False
        time.sleep(0.1)
    return True


def _signal(pgid, pid, sig) -> None:
    try:
        if pgid is not None:
            os.killpg(int(pgid), sig)
        elif pid is not None:
            os.kill(int(pid), sig)
    except (ProcessLookupError, PermissionError):
        pass
