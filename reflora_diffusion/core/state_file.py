"""The Refactorer's state as one safetensors file: tensors as tensors, everything else as JSON metadata."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

STATE_FILE = "refactorer.safetensors"


def save(state: dict, directory) -> Path:
    """Write ``state`` (nested dicts / lists of numbers, strings and tensors) to ``directory/STATE_FILE``, atomically."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}

    def encode(obj, key):
        if isinstance(obj, torch.Tensor):
            tensors[key] = obj.detach().cpu().contiguous()
            return {"__tensor__": key}
        if isinstance(obj, dict):
            return {k: encode(v, f"{key}.{k}") for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [encode(v, f"{key}.{i}") for i, v in enumerate(obj)]
        return obj

    meta = encode(state, "state")
    path = Path(directory) / STATE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"refactorer": json.dumps(meta)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def load(directory) -> dict:
    """The state written by :func:`save` (``directory`` or the file itself)."""
    from safetensors import safe_open

    path = Path(directory)
    path = path / STATE_FILE if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"no Refactorer state at {path}; pass the checkpoint folder that holds {STATE_FILE}.")
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["refactorer"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}

    def decode(obj):
        if isinstance(obj, dict):
            return tensors[obj["__tensor__"]] if set(obj) == {"__tensor__"} else {k: decode(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [decode(v) for v in obj]
        return obj

    return decode(meta)
