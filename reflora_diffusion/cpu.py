"""CPU threads: one rule for every trainer and the app.

On a CPU, OpenMP threads of processes that share the cores fight each other: OpenMP workers spin while
they wait, so with one other busy process on a 2-core machine a tiny 64 px step took 2.5 s with default
threads, 0.12 s with OMP_NUM_THREADS=1 and 0.14 s with OMP_WAIT_POLICY=PASSIVE (benchmarks/cpu_threads.py).
So the entry points ask OpenMP to sleep instead of spin (unless the user set a policy), an explicit
OMP_NUM_THREADS is always honoured, otherwise a trainer takes cores // (its processes on this machine),
and the app gives each job cores // (jobs it runs at once).
"""

from __future__ import annotations

import os


def prefer_passive_waiting() -> None:
    """OMP_WAIT_POLICY=PASSIVE unless set: must run before torch is imported (OpenMP reads it on load)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


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
