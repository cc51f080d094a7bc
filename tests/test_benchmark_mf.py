"""The paper's matrix-factorization fact (Figure 2), through the real core: at GD lr 0.03 plain LoRA
diverges while RefLoRA drives the loss below 1e-3 within 40 iterations."""

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import matrix_factorization as mf  # noqa: E402


def test_reflora_converges_where_lora_diverges():
    Y = mf.target(100, 4, seed=0)
    reflora = mf.run("reflora", 0.03, Y, rank=4, iters=40, seed=0)
    lora = mf.run("lora", 0.03, Y, rank=4, iters=40, seed=0)
    hit = mf.first_below(reflora)
    assert hit is not None and hit < 40, reflora[-5:]
    assert not math.isfinite(lora[-1]) or lora[-1] > 1e6


def test_reflora_s_beats_lora_at_small_lr():
    Y = mf.target(100, 4, seed=0)
    lora = mf.run("lora", 0.01, Y, rank=4, iters=40, seed=0)
    reflora_s = mf.run("reflora-s", 0.01, Y, rank=4, iters=40, seed=0)
    assert reflora_s[-1] < 0.1 * lora[-1]
