"""Aspect-ratio buckets, as kohya-ss/sd-scripts makes them (`--enable_bucket` and its flags keep kohya's names).

A bucket is a (width, height) whose sides are multiples of `step` in [min_reso, max_reso] and whose area is at
most resolution^2: for each width, the tallest height that keeps the square's pixel count (and the transpose).
An image trains at the bucket whose aspect ratio is nearest its own: it is resized to cover the bucket and
cropped (data.py). With `no_upscale`, an image of fewer pixels than resolution^2 is never enlarged: its bucket
is its own size rounded down to the step. Larger images use the predefined buckets either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from collections import Counter


@dataclass(frozen=True)
class Buckets:
    resolution: int
    min_reso: int = 256
    max_reso: int = 1024
    step: int = 64
    no_upscale: bool = False

    @classmethod
    def from_config(cls, cfg) -> "Buckets | None":
        """The config's buckets, or None without --enable_bucket (every image then trains square)."""
        if not cfg.enable_bucket:
            return None
        return cls(cfg.resolution, cfg.min_bucket_reso, cfg.max_bucket_reso, cfg.bucket_reso_steps,
                   cfg.bucket_no_upscale)

    @cached_property
    def sizes(self) -> list[tuple[int, int]]:
        """The predefined buckets (width, height), sorted (kohya's make_bucket_resolutions)."""
        area, step = self.resolution ** 2, self.step
        side = self.resolution // step * step
        sizes = {(side, side)}
        for w in range(self.min_reso, self.max_reso + 1, step):
            h = min(self.max_reso, area // w // step * step)
            if h >= self.min_reso:
                sizes |= {(w, h), (h, w)}
        return sorted(sizes)

    def select(self, width: int, height: int) -> tuple[int, int]:
        """The bucket (width, height) an image of this size trains at."""
        if self.no_upscale and width * height <= self.resolution ** 2:
            return self._round_down(width), self._round_down(height)
        ratio = width / height
        return min(self.sizes, key=lambda s: abs(s[0] / s[1] - ratio))  # first of ties, as kohya's argmin

    def _round_down(self, side: int) -> int:
        return min(self.max_reso, max(self.step, side - side % self.step))


def default_bucket_options(resolution: int, multiple: int = 8) -> dict:
    """Bucket flags scaled to a resolution from kohya's SD 1.5 defaults (512: 256..1024 in steps of 64); the
    tiny presets' 64 px gets 32..128 in steps of 16. The step is rounded up to a multiple of `multiple` (the
    model's pixel multiple, presets.pixel_multiple) and the bounds to multiples of the step."""
    step = 64 if resolution >= 256 else 16
    step = -(-step // multiple) * multiple
    return {"min_bucket_reso": max(step, resolution // 2 // step * step),
            "max_bucket_reso": max(resolution * 2 // step * step, -(-resolution // step) * step),
            "bucket_reso_steps": step}


def describe(buckets: "Buckets", targets: list[tuple[int, int]]) -> str:
    """One line: which buckets a run uses and how many images each holds."""
    counts = Counter(targets)
    sizes = ", ".join(f"{w}x{h} ({n})" for (w, h), n in sorted(counts.items()))
    return (f"aspect-ratio buckets (sides {buckets.min_reso}..{buckets.max_reso}, step {buckets.step}): "
            f"{len(counts)} in use: {sizes}")
