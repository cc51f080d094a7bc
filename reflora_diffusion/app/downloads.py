"""Export a run (or one of its checkpoints) for download and describe the file.

The export itself is `reflora_diffusion.export.export_run`, the same code as
`python -m reflora_diffusion.export`; this module picks the source safely inside the runs
directory, puts the result in <run>/exports/<format>-<source>/ and reads the file back to show
what a user gets: key count, rank, alpha and method, taken from the file itself.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from reflora_diffusion.rundir import read_json

from .runs import is_run_dir, safe_path

FORMATS = ("diffusers", "kohya")
FINAL = "final"


class ExportError(ValueError):
    """A source or format that cannot be exported; shown to the user as is."""


def export_sources(runs_dir, name: str) -> list[str]:
    """'final' (if the run has its final adapter) and checkpoint-N folders, newest checkpoint first."""
    run_dir = safe_path(runs_dir, name)
    sources = [FINAL] if (run_dir / "pytorch_lora_weights.safetensors").is_file() else []
    ckpts = [p.name for p in (run_dir / "checkpoints").glob("checkpoint-*") if p.is_dir()]
    return sources + sorted(ckpts, key=_ckpt_step, reverse=True)


def _ckpt_step(name: str) -> int:
    m = re.search(r"(\d+)$", name)
    return int(m.group(1)) if m else -1


def export_for_download(runs_dir, name: str, source: str = FINAL, format: str = "diffusers") -> dict:
    """Export and return {"file": .safetensors path, "card": model card path or None, "info": {...}}."""
    from reflora_diffusion.export import export_run
    from reflora_diffusion.export.run import card_path

    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    run_dir = safe_path(runs_dir, name)
    if not is_run_dir(run_dir):
        raise ExportError(f"no run named {name!r}")
    source = source or FINAL
    if source != FINAL and not re.fullmatch(r"checkpoint-\d+", source):
        raise ExportError(f"unknown export source {source!r}; choose 'final' or a checkpoint-N of the run")
    src = run_dir if source == FINAL else safe_path(runs_dir, name, "checkpoints", source)
    if source not in export_sources(runs_dir, name):
        raise ExportError(f"run {name!r} has no {source} to export yet; wait for the run or pick a checkpoint")
    out = safe_path(runs_dir, name, "exports", f"{format}-{source}")
    try:  # overwrite: this is the app's own derived folder, re-exported on every request
        file = Path(export_run(str(src), format=format, output=str(out), overwrite=True, name=run_dir.name))
    except ValueError as e:  # the exporter's ExportError: one line naming the problem
        raise ExportError(str(e)) from None
    card = next((p for p in (card_path(out, file if format == "kohya" else None), run_dir / "README.md")
                 if p.is_file()), None)
    info = adapter_info(file)
    if info["method"] is None:  # a file without the method in its metadata
        info["method"] = (read_json(run_dir / "config.json", {}) or {}).get("method")
    return {"file": file, "card": card, "info": info}


def adapter_info(path) -> dict:
    """Key count, rank(s), alpha(s) and method read from a LoRA .safetensors file (diffusers or kohya)."""
    from safetensors import safe_open

    ranks, alphas = set(), set()
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        metadata = f.metadata() or {}
        for k in keys:
            if re.search(r"(lora_A|lora_down|lora\.down)(\.[^.]+)?\.weight$", k):
                ranks.add(int(f.get_slice(k).get_shape()[0]))
            elif k.endswith(".alpha"):
                alphas.add(float(f.get_tensor(k).item()))
    # diffusers: {"lora_adapter_metadata": json({"unet.r": 4, "unet.lora_alpha": 8, ...})}
    packed = metadata.get("lora_adapter_metadata")
    if packed:
        try:
            for k, v in json.loads(packed).items():
                if k.endswith("lora_alpha") and v is not None:
                    alphas.add(float(v))
        except ValueError:
            pass
    if not alphas and metadata.get("ss_network_alpha"):
        alphas.add(float(metadata["ss_network_alpha"]))
    method = metadata.get("reflora_method")
    if not method and metadata.get("reflora_info"):  # diffusers files: the trainer's facts as JSON
        try:
            method = json.loads(metadata["reflora_info"]).get("method")
        except ValueError:
            pass
    fmt = "kohya" if any(k.startswith(("lora_unet_", "lora_te")) for k in keys) else "diffusers"
    return {"file": Path(path).name, "format": fmt, "keys": len(keys), "rank": _one(ranks),
            "alpha": _one(alphas), "method": method, "metadata": metadata}


def _one(values: set):
    """A single value when the file is uniform, else the sorted list (e.g. per-layer ranks)."""
    if not values:
        return None
    return next(iter(values)) if len(values) == 1 else sorted(values)


def info_markdown(info: dict) -> str:
    return (f"**{info['file']}** ({info['format']} format): {info['keys']} keys, rank {info['rank']}, "
            f"alpha {info['alpha']}, method **{info['method']}**")
