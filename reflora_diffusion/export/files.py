"""Writing adapter files safely: temporary name then os.replace, and no silent overwrite of another adapter."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from .factors import ExportError


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


def check_target(path: Path, new: dict[str, torch.Tensor], overwrite: bool) -> None:
    """Refuse to replace an existing adapter file that holds different weights (unless overwrite)."""
    if overwrite or not path.exists():
        return
    from safetensors.torch import load_file

    try:
        old = load_file(str(path))
    except Exception:
        old = None
    if old is None or not same_tensors(old, new):
        raise ExportError(f"{path} already holds a different adapter; pass overwrite=True (CLI: --overwrite) "
                          "or choose another output folder.")


def temp_path(target: Path) -> Path:
    """A fresh temporary file name beside target (same file system, so os.replace is atomic)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    return Path(name)


def publish(tmp: Path, target: Path) -> None:
    """Give tmp ordinary permissions (mkstemp and safetensors make 0600) and rename it to target."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, target)


def save_safetensors(tensors: dict[str, torch.Tensor], target: Path, metadata: dict[str, str],
                     overwrite: bool) -> Path:
    from safetensors.torch import save_file

    check_target(target, tensors, overwrite)
    tmp = temp_path(target)
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        publish(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def write_text(text: str, target: Path) -> Path:
    tmp = temp_path(target)
    try:
        tmp.write_text(text)
        publish(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target
