"""What the benchmark scripts share: paths, offline mode, method@variant names, JSON + PNG output written whole or not
at all, resumable cells, and the in-process SD trainer. (Seeding is one torch.manual_seed / Generator per script.)

Scripts in this folder import it as ``import common`` (Python puts a script's own folder on the path).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded: presets are built offline, data is local

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DATA = REPO.parent / "shared" / "data"  # the real data sets beside a checkout (DreamBooth photos, GLUE, commonsense)
DREAMBOOTH = DATA / "dreambooth"


# ---------------------------------------------------------------------------- method@variant names
VARIANTS = {  # variant -> the trainers' option names (core/options.py)
    "": {},
    "normalize": {"reflora_normalize": True},  # det S* = 1
    "update": {"reflora_apply_to": "update"},  # S* on the optimizer's step
    "factors": {"reflora_apply_to": "factors"},  # balanced factors, optimizer moments carried
    "reinit": {"reinit": True},  # random full-rank factors at step 0 (base weight compensated), any method
    # "warmupN": refactor after N plain LoRA steps instead of the benchmark's own warm-up (split_method)
}


def split_method(name: str) -> tuple[str, dict]:
    """"reflora@factors" -> ("reflora", {"reflora_apply_to": "factors"}); variants combine ("reflora@normalize@reinit");
    a plain method name has no options. The one spelling every benchmark takes."""
    method, *variants = name.split("@")
    options = {}
    for variant in variants:
        if re.fullmatch(r"warmup\d+", variant):
            options["refactor_warmup_steps"] = int(variant[len("warmup"):])
            continue
        if variant not in VARIANTS:
            raise SystemExit(f"error: unknown variant {variant!r} in {name!r}; use one of "
                             f"{sorted(v for v in VARIANTS if v) + ['warmupN']}")
        options.update(VARIANTS[variant])
    return method, options


METHOD_NAMES = {"lora": "LoRA", "reflora": "RefLoRA", "reflora-s": "RefLoRA-S", "lora+": "LoRA+"}


def method_label(name: str) -> str:
    """How reports name a method: "reflora@factors" -> "RefLoRA `factors`"."""
    base, _, variant = name.partition("@")
    return METHOD_NAMES.get(base, base) + (f" `{variant}`" if variant else "")


def option_flags(options: dict) -> list[str]:
    """The same options as command-line flags."""
    return [f for k, v in options.items() for f in (f"--{k}", str(v).lower() if isinstance(v, bool) else str(v))]


# ---------------------------------------------------------------------------- output
def write_text(path: str | os.PathLike, text: str) -> Path:
    """``text`` at ``path``, whole or not at all (a temporary file, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def write_json(path: str | os.PathLike, obj, indent: int | None = 1, allow_nan: bool = True) -> Path:
    """``obj`` as JSON at ``path``, whole or not at all; ``allow_nan=False`` refuses NaN / inf, which strict JSON
    readers reject."""
    return write_text(path, json.dumps(obj, indent=indent, allow_nan=allow_nan) + "\n")


def pyplot():
    """matplotlib.pyplot on the file-only backend (no display here)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    """``fig`` as a PNG at ``path``, whole or not at all; the figure is closed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=dpi)
    os.replace(tmp, path)
    pyplot().close(fig)
    return path


def cell(path: str | os.PathLike, compute: Callable[[], dict]) -> tuple[dict, bool]:
    """A resumable unit of a long benchmark: (the result stored at ``path``, False) when that file exists, else
    (``compute()``, True) after storing it there whole. Long sweeps are grids of these, run in the background."""
    path = Path(path)
    if path.is_file():
        return json.loads(path.read_text()), False
    result = compute()
    write_json(path, result)
    return result, True


def run_parallel(commands: list[list[str]], jobs: int, logs: str | os.PathLike,
                 on_exit: Callable[[int, int, float], None] | None = None) -> list[int]:
    """Run ``commands`` (argv lists) ``jobs`` at a time; returns their exit codes, in order.

    Each process gets its share of this process's cores: pinned to its own ``cores // jobs`` of them (Linux) with
    OMP_NUM_THREADS set to that count. Two processes with default threads on shared cores run many times slower
    (OpenMP oversubscription). Output goes to ``<logs>/<i>.log``. ``on_exit(i, returncode, seconds)`` is called
    as each one ends.
    """
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    jobs = max(1, min(jobs, len(commands), len(cores)))
    share = len(cores) // jobs
    slots = [cores[k * share:(k + 1) * share] for k in range(jobs)]
    logs = Path(logs)
    logs.mkdir(parents=True, exist_ok=True)
    codes: list[int | None] = [None] * len(commands)
    running: dict[int, tuple[subprocess.Popen, list[int], float]] = {}  # command index -> (process, cores, start)
    pending = list(range(len(commands)))
    while pending or running:
        while pending and len(running) < jobs:
            i = pending.pop(0)
            mine = next(s for s in slots if all(s is not c for _, c, _ in running.values()))
            pin = (lambda: os.sched_setaffinity(0, mine)) if hasattr(os, "sched_setaffinity") else None
            with open(logs / f"{i}.log", "w") as log:
                proc = subprocess.Popen(commands[i], stdout=log, stderr=subprocess.STDOUT, preexec_fn=pin,
                                        env={**os.environ, "OMP_NUM_THREADS": str(len(mine))})
            running[i] = (proc, mine, time.perf_counter())
        time.sleep(0.2)
        for i, (proc, _, start) in list(running.items()):
            if proc.poll() is not None:
                del running[i]
                codes[i] = proc.returncode
                if on_exit:
                    on_exit(i, proc.returncode, time.perf_counter() - start)
    return codes


# ---------------------------------------------------------------------------- the SD trainer, in process
def sd_trainer(method: str, output_dir: str | os.PathLike, **options):
    """An SD trainer, set up in this process (accelerate's state reset), for ``method`` (a method@variant name) and
    the trainer's own option names."""
    from reflora_diffusion.sd.config import make_config
    from reflora_diffusion.sd.train import SDTrainer

    core, variant_options = split_method(method)
    cfg = make_config({**options, **variant_options, "method": core, "output_dir": str(output_dir)})  # the variant wins
    trainer = SDTrainer.in_process(cfg)
    trainer.setup()
    return trainer
