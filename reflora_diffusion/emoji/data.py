"""Captioned emoji images for the `tiny-emoji` base: Noto (Google) and Twemoji (Twitter) at 64x64.

The images come from the npm packages of iamcal's emoji-data (`emoji-datasource-google` /
`emoji-datasource-twitter`, pinned versions, sha256-checked), fetched with `npm pack` into the cache.
Each base emoji (no skin-tone variants, no "Component" swatches) becomes one RGB PNG composited onto
white, captioned from its Unicode name ("BLUE HEART" -> "blue heart", "Egypt Flag" -> "flag of egypt"),
in a folder with `metadata.jsonl` (`file_name`, `text`) that `train/sd.py --train_data_dir` reads as is.

    python -m reflora_diffusion.emoji.data --style google      # prints the prepared folder

Licences (written as NOTICE.md next to the data): Noto emoji images Apache-2.0 (Google), Twemoji
graphics CC-BY 4.0 (Twitter, Inc and other contributors), emoji-data metadata MIT (Cal Henderson).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

VERSION = "16.0.0"
# sha256 of the `npm pack` tarballs (checked after every download).
PACKAGES = {
    "google": ("emoji-datasource-google", "fb5fd131b362aab7a55542d2a147a79708cce0a8b1c1bbacd470172708b5c438"),
    "twitter": ("emoji-datasource-twitter", "f64a530c63bca463bd8317fdc4615ce63a53a0c65018e4ce2d848aaba7a28877"),
}
STYLES = tuple(PACKAGES)
IMAGE_SIZE = 64

NOTICE = """# Licences of the emoji images in this folder

- Images of style `google`: Noto Emoji, Copyright Google Inc., Apache License 2.0
  (https://github.com/googlefonts/noto-emoji/blob/main/LICENSE).
- Images of style `twitter`: Twemoji graphics, Copyright Twitter, Inc and other contributors,
  Creative Commons Attribution 4.0 International (CC-BY 4.0,
  https://creativecommons.org/licenses/by/4.0/), https://github.com/jdecked/twemoji.
- Names and metadata (emoji.json): emoji-data by Cal Henderson (iamcal), MIT licence (LICENSE.emoji-data).

Taken from the npm packages emoji-datasource-google@{v} / emoji-datasource-twitter@{v}; the images were
composited onto white and saved as RGB PNGs (a modification).
"""


@dataclass(frozen=True)
class EmojiItem:
    caption: str
    image: str  # file name inside the package's img/<style>/64/
    category: str
    short_name: str


def cache_root() -> Path:
    """$REFLORA_CACHE, else ~/.cache/reflora_diffusion (the same root as the model presets)."""
    root = os.environ.get("REFLORA_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "reflora_diffusion"


# Unicode names that contradict the picture (colour words must steer colour).
RENAMED = {"heavy black heart": "red heart"}


def caption_for(name: str, subcategory: str = "") -> str:
    """Lower-cased Unicode name; country/region flags read "flag of <place>" ("Egypt Flag" / "flag: Egypt")."""
    text = " ".join(name.replace("\u2019", "'").split()).lower()
    if text.startswith("flag: "):
        return "flag of " + text[len("flag: "):]
    if subcategory in ("country-flag", "subdivision-flag") and text.endswith(" flag"):
        return "flag of " + text[: -len(" flag")]  # not "pirate flag" or "mailbox with raised flag"
    return RENAMED.get(text, text)


def build_items(emoji_json: list[dict], style: str) -> list[EmojiItem]:
    """Base emoji with an image of `style`, captioned; a repeated caption keeps its first emoji only."""
    items, seen = [], set()
    for entry in sorted(emoji_json, key=lambda e: e.get("sort_order", 0)):
        if entry.get("category") == "Component" or not entry.get(f"has_img_{style}", False):
            continue  # skin-tone swatches / hair parts, or no image in this set
        caption = caption_for(entry["name"], entry.get("subcategory", ""))
        if caption in seen:
            continue
        seen.add(caption)
        items.append(EmojiItem(caption, entry["image"], entry.get("category", ""), entry.get("short_name", "")))
    return items


def _npm() -> str:
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError(
            "npm was not found on PATH: install Node.js with npm (e.g. `apt-get install npm`) to fetch the "
            "emoji images, or copy an already prepared emoji folder into the cache"
        )
    return npm


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_package(style: str, root: Path | None = None) -> Path:
    """`npm pack` the style's package into <root>/emoji/npm (once), check its sha256, return the .tgz."""
    if style not in PACKAGES:
        raise ValueError(f"unknown emoji style {style!r}: choose one of {', '.join(STYLES)}")
    package, sha = PACKAGES[style]
    folder = (root or cache_root()) / "emoji" / "npm"
    tgz = folder / f"{package}-{VERSION}.tgz"
    if tgz.is_file() and _sha256(tgz) == sha:
        return tgz
    npm = _npm()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".npm-", dir=folder))
    try:
        done = subprocess.run(
            [npm, "pack", f"{package}@{VERSION}", "--pack-destination", str(tmp)],
            capture_output=True, text=True,
        )  # fmt: skip
        got = tmp / tgz.name
        if done.returncode != 0 or not got.is_file():
            raise RuntimeError(f"`npm pack {package}@{VERSION}` failed: {done.stderr.strip()[-500:]}")
        if _sha256(got) != sha:
            raise RuntimeError(f"{package}@{VERSION}: sha256 {_sha256(got)} does not match the recorded {sha}")
        os.replace(got, tgz)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return tgz


def prepare(style: str = "google", root: Path | None = None) -> Path:
    """Folder <root>/emoji/<style>-<version>/ with images/*.png, metadata.jsonl, NOTICE.md (built once)."""
    root = root or cache_root()
    out = root / "emoji" / f"{style}-{VERSION}"
    if (out / "metadata.jsonl").is_file():
        return out
    from PIL import Image

    tgz = fetch_package(style, root)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        prefix = f"package/img/{style}/{IMAGE_SIZE}/"
        pngs: dict[str, bytes] = {}
        with tarfile.open(tgz) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                if member.name == "package/emoji.json":
                    emoji_json = json.load(tar.extractfile(member))
                elif member.name == "package/LICENSE":
                    (tmp / "LICENSE.emoji-data").write_bytes(tar.extractfile(member).read())
                elif member.name.startswith(prefix) and member.name.endswith(".png"):
                    pngs[member.name[len(prefix):]] = tar.extractfile(member).read()
        (tmp / "images").mkdir()
        lines = []
        for i, item in enumerate(build_items(emoji_json, style)):
            if item.image not in pngs:
                continue
            rgba = Image.open(io.BytesIO(pngs[item.image])).convert("RGBA")
            if rgba.size != (IMAGE_SIZE, IMAGE_SIZE):
                rgba = rgba.resize((IMAGE_SIZE, IMAGE_SIZE), Image.LANCZOS)
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            name = f"images/{i:04d}_{Path(item.image).stem}.png"
            Image.alpha_composite(white, rgba).convert("RGB").save(tmp / name)
            lines.append(json.dumps({"file_name": name, "text": item.caption, "category": item.category,
                                     "short_name": item.short_name}))  # fmt: skip
        (tmp / "metadata.jsonl").write_text("\n".join(lines) + "\n")
        (tmp / "NOTICE.md").write_text(NOTICE.replace("{v}", VERSION))
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load(style: str = "google", root: Path | None = None) -> tuple[list[str], "object"]:
    """(captions, uint8 array N x 64 x 64 x 3) of the prepared set (prepared on first use)."""
    import numpy as np
    from PIL import Image

    folder = prepare(style, root)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines() if line]
    images = np.stack([np.asarray(Image.open(folder / r["file_name"]).convert("RGB")) for r in rows])
    return [r["text"] for r in rows], images


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--style", choices=(*STYLES, "all"), default="all")
    args = parser.parse_args(argv)
    for style in STYLES if args.style == "all" else (args.style,):
        folder = prepare(style)
        count = sum(1 for _ in open(folder / "metadata.jsonl"))
        print(f"{style}: {count} images in {folder}")


if __name__ == "__main__":
    main()
