"""Latents and prompt embeddings cached on disk (--cache_dir), shared by runs and methods.

An entry's name is a hash of everything its value depends on: the base model's identity (resolved folder or hub id,
revision, the encoder's config, and for a local folder the sizes and times of its weight files), the family, and the
input itself (the preprocessed pixel tensor: data content, resolution, bucket, crop and flip; or the prompt and the
tokenizer's length). Change any of them and the entry is a different one, so nothing stale is read; an A/B run of two
methods on the same data encodes it once. Entries are safetensors files written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch


def _file_stamps(folder: Path) -> list:
    if not folder.is_dir():
        return []
    return sorted((p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in folder.iterdir()
                  if p.suffix in (".safetensors", ".bin"))


def model_identity(path: str, revision, subfolder: str, config: dict) -> str:
    """What an encoder's output depends on besides its input."""
    return json.dumps({"path": str(path), "revision": revision, "subfolder": subfolder,
                       "config": {k: v for k, v in config.items() if not k.startswith("_")},
                       "files": _file_stamps(Path(path) / subfolder)}, sort_keys=True, default=str)


class DiskCache:
    def __init__(self, root: str | Path, identity: str):
        self.root = Path(root)
        self.identity = identity
        self.hits = self.misses = 0

    def path(self, kind: str, *parts) -> Path:
        h = hashlib.sha256(self.identity.encode())
        for part in parts:
            if isinstance(part, torch.Tensor):
                t = part.detach().cpu().contiguous()
                h.update(str((tuple(t.shape), str(t.dtype))).encode())
                h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            else:
                h.update(repr(part).encode())
        return self.root / kind / f"{h.hexdigest()[:40]}.safetensors"

    def load(self, path: Path) -> dict[str, torch.Tensor] | None:
        if not path.is_file():
            self.misses += 1
            return None
        from safetensors.torch import load_file

        try:
            out = load_file(str(path))
        except Exception:  # noqa: BLE001 - a damaged entry is recomputed (and rewritten)
            self.misses += 1
            return None
        self.hits += 1
        return out

    def save(self, path: Path, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        try:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
