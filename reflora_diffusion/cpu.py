"""CPU threads: one rule for every trainer and the app.

OpenMP threads of processes that share the cores fight each other. Measured on this 2-core machine
(benchmarks/cpu_threads.py, tiny 64 px step): idle, torch's default threads 0.091 s, OMP_NUM_THREADS=1 0.121 s,
OMP_WAIT_POLICY=PASSIVE 0.153 s; with one busy neighbour process 0.310 / 0.123 / 0.140 s; with several busy
processes the default degraded up to 17x. So nothing changes for a lone process (the default is fastest),
an explicit OMP_NUM_THREADS is always honoured, a trainer takes cores // (its processes on this machine), and
the app, which runs jobs side by side, gives each job cores // (jobs it runs at once).
"""

from __future__ import annotations

import os


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def threads_per_process(processes: int) -> int:
    return max(1, usable_cores() // max(1, int(processes)))


def configure_cpu_threads(local_processes: int = 1) -> int:
    """Set torch's intra-op threads to this process's share unless OMP_NUM_THREADS says otherwise."""
    import torch

    explicit = os.environ.get("OMP_NUM_THREADS", "").strip()
    n = int(explicit) if explicit.isdigit() and int(explicit) > 0 else threads_per_process(local_processes)
    torch.set_num_threads(n)
    return n


def distributed_cpu_run() -> bool:
    """True for a multi-process launch (torchrun, `accelerate launch --num_processes N`) on a machine with
    no GPU: accelerate then needs cpu=True to set up gloo instead of silently running N copies (its FSDP and
    multi-GPU launchers do not pass a config's use_cpu on to the processes)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import torch

    xpu = getattr(torch, "xpu", None)
    return not torch.cuda.is_available() and not (xpu is not None and xpu.is_available())
