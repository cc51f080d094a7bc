"""Training images: DreamBooth folders and captioned image folders, cropped and flipped reproducibly.

Images are decoded once, at load time, and kept resized (shorter side = resolution): every file is checked
up front (corrupt ones are named and skipped) and the training loop never waits on JPEG decoding.

Random crop and flip are a pure function of (seed, epoch, index): the sampler hands the dataset
`(epoch, index)` keys. So augmentation does not depend on worker processes, on prefetching, or on where
a run was resumed, and a 2-process run sees exactly the images of a 1-process run.
"""

from __future__ import annotations

import csv
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
# Files that sit beside images by design: not worth a warning.
_SIDECARS = {".txt", ".jsonl", ".json", ".csv", ".md"}


class DataError(ValueError):
    """A user-fixable problem with the training data; the message is one line naming the path and the fix."""


# --- files -----------------------------------------------------------------------------------------------
def list_images(folder: str | Path, what: str = "data folder") -> list[Path]:
    """Image files of a folder (sorted). Other files are skipped with one warning."""
    folder = Path(folder)
    if not folder.exists():
        raise DataError(f"{what} {str(folder)!r} does not exist; check the path")
    if not folder.is_dir():
        raise DataError(f"{what} {str(folder)!r} is not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    other = [p.name for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS | _SIDECARS]
    if other:
        warnings.warn(f"{what} {str(folder)!r}: skipping {len(other)} non-image file(s): "
                      f"{', '.join(other[:5])}{' ...' if len(other) > 5 else ''}", stacklevel=2)
    if not images:
        raise DataError(f"{what} {str(folder)!r} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}); "
                        "add some or fix the path")
    return images


def load_resized(path: Path, resolution: int) -> tuple[Image.Image, tuple[int, int]] | None:
    """(RGB image with its shorter side = resolution, original (h, w)), or None if the file cannot be decoded."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF orientation with a 90 degree turn
                w, h = h, w
            im.draft("RGB", (resolution, resolution))  # JPEG: decode at reduced scale (much faster)
            im = ImageOps.exif_transpose(im).convert("RGB")
            scale = resolution / min(im.size)
            new = (max(resolution, round(im.size[0] * scale)), max(resolution, round(im.size[1] * scale)))
            return im.resize(new, Image.Resampling.BICUBIC), (h, w)
    except Exception:  # noqa: BLE001 - PIL raises many types for bad files
        return None


# Below this shorter side an image holds nothing to learn from (a 1x1 "photo" trains silently otherwise).
MIN_IMAGE_SIDE = 16


def load_images(paths: list[Path], resolution: int, what: str):
    """(paths, images, original sizes) of the usable files; corrupt and tiny ones are named in a warning,
    and images upscaled more than 2x to the training resolution get a warning too."""
    good, images, sizes, bad, tiny, small = [], [], [], [], [], []
    for p in paths:
        loaded = load_resized(p, resolution)
        if loaded is None:
            bad.append(p.name)
        elif min(loaded[1]) < MIN_IMAGE_SIDE:
            tiny.append(f"{p.name} ({loaded[1][1]}x{loaded[1][0]})")
        else:
            if min(loaded[1]) * 2 < resolution:
                small.append(f"{p.name} ({loaded[1][1]}x{loaded[1][0]})")
            good.append(p)
            images.append(loaded[0])
            sizes.append(loaded[1])
    if bad:
        warnings.warn(f"{what}: skipping {len(bad)} unreadable image(s): {', '.join(bad)}", stacklevel=2)
    if tiny:
        warnings.warn(f"{what}: skipping {len(tiny)} image(s) smaller than {MIN_IMAGE_SIDE} px: {', '.join(tiny)}",
                      stacklevel=2)
    if small:
        warnings.warn(f"{what}: {len(small)} image(s) are upscaled more than 2x to --resolution {resolution} and "
                      f"will look blurry: {', '.join(small[:5])}{' ...' if len(small) > 5 else ''}", stacklevel=2)
    if not images:
        reasons = [f"unreadable: {', '.join(bad)}"] * bool(bad) + [f"smaller than {MIN_IMAGE_SIDE} px: {', '.join(tiny)}"] * bool(tiny)
        raise DataError(f"{what}: no usable image left ({'; '.join(reasons)}); replace the files")
    return good, images, sizes


# --- captions --------------------------------------------------------------------------------------------
def read_captions(folder: Path, images: list[Path], image_column: str, caption_column: str,
                  default: str | None = None) -> list[str]:
    """Caption per image from metadata.jsonl / metadata.csv (datasets' imagefolder layout) or <name>.txt."""
    table: dict[str, str] = {}
    jsonl, csv_path = folder / "metadata.jsonl", folder / "metadata.csv"
    rows = []
    if jsonl.is_file():
        for n, line in enumerate(jsonl.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    raise DataError(f"{jsonl}: line {n} is not valid JSON") from None
    elif csv_path.is_file():
        with open(csv_path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    source = jsonl if jsonl.is_file() else csv_path
    for n, row in enumerate(rows, 1):
        if image_column not in row or caption_column not in row:
            raise DataError(f"{source}: row {n} lacks column {image_column!r} or {caption_column!r}; set "
                            "--image_column / --caption_column to the names used in the file")
        table[Path(str(row[image_column])).name] = str(row[caption_column])
    captions = []
    for p in images:
        txt = p.with_suffix(".txt")
        if p.name in table:
            captions.append(table[p.name])
        elif txt.is_file():
            captions.append(txt.read_text(encoding="utf-8").strip())
        elif default is not None:
            captions.append(default)
        else:
            raise DataError(f"no caption for {p}: add it to metadata.jsonl ({image_column!r}, {caption_column!r}) "
                            f"or write {txt.name}, or pass --instance_prompt as the default caption")
    return captions


# --- augmentation ----------------------------------------------------------------------------------------
@dataclass
class Crop:
    resolution: int
    center_crop: bool
    random_flip: bool
    seed: int

    def __call__(self, image: Image.Image, epoch: int, index: int) -> tuple[torch.Tensor, tuple[int, int]]:
        """(C, H, W) tensor in [-1, 1] and the crop's top-left (y, x), as SDXL's micro-conditioning wants."""
        g = torch.Generator().manual_seed(hash((self.seed, epoch, index)) % 2**63)
        w, h = image.size
        r = self.resolution
        if self.center_crop:
            top, left = (h - r) // 2, (w - r) // 2
        else:
            top = int(torch.randint(0, h - r + 1, (), generator=g))
            left = int(torch.randint(0, w - r + 1, (), generator=g))
        image = image.crop((left, top, left + r, top + r))
        flip = self.random_flip and bool(torch.rand((), generator=g) < 0.5)
        if flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(r, r, 3)
        return x.permute(2, 0, 1).float().div(127.5).sub(1.0), (top, left)


# --- datasets --------------------------------------------------------------------------------------------
class ImageCaptionSet:
    """Loaded images with one prompt each (a DreamBooth folder, a class folder or a captioned folder)."""

    def __init__(self, paths: list[Path], images: list[Image.Image], sizes: list[tuple[int, int]],
                 prompts: list[str]):
        self.paths, self.images, self.sizes, self.prompts = paths, images, sizes, prompts

    def __len__(self) -> int:
        return len(self.images)

    @classmethod
    def from_folder(cls, folder, resolution, prompt=None, captions=False, image_column="file_name",
                    caption_column="text", what="data folder") -> "ImageCaptionSet":
        paths = list_images(folder, what)
        paths, images, sizes = load_images(paths, resolution, f"{what} {str(folder)!r}")
        if captions:
            prompts = read_captions(Path(folder), paths, image_column, caption_column, default=prompt)
        else:
            prompts = [prompt] * len(paths)
        return cls(paths, images, sizes, prompts)


class TrainDataset(torch.utils.data.Dataset):
    """Instance images (+ class images for prior preservation). Keys are (epoch, index) pairs.

    Length is max(instances, class images), as in diffusers' DreamBooth: every item pairs instance
    `i % n_instance` with class image `i % n_class`.
    """

    def __init__(self, instances: ImageCaptionSet, crop: Crop, classes: ImageCaptionSet | None = None):
        self.instances, self.classes, self.crop = instances, classes, crop

    def __len__(self) -> int:
        return max(len(self.instances), len(self.classes) if self.classes else 0)

    def __getitem__(self, key) -> dict:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        i = index % len(self.instances)
        pixels, crop_top_left = self.crop(self.instances.images[i], epoch, index)
        item = {"index": index, "pixel_values": pixels, "prompt": self.instances.prompts[i],
                "original_size": self.instances.sizes[i], "crop_top_left": crop_top_left}
        if self.classes is not None:
            j = index % len(self.classes)
            pixels, crop_top_left = self.crop(self.classes.images[j], epoch, index + 7919)
            item.update(class_pixel_values=pixels, class_prompt=self.classes.prompts[j],
                        class_original_size=self.classes.sizes[j], class_crop_top_left=crop_top_left)
        return item


def collate(items: list[dict]) -> dict:
    """Batch; with prior preservation the class half follows the instance half (the loss splits it)."""
    prior = "class_pixel_values" in items[0]

    def field(name):
        return [it[name] for it in items] + ([it["class_" + name] for it in items] if prior else [])

    return {"index": torch.tensor([it["index"] for it in items]),
            "pixel_values": torch.stack(field("pixel_values")),
            "prompts": field("prompt"),
            "original_sizes": field("original_size"),
            "crop_top_lefts": field("crop_top_left")}


class EpochSampler(torch.utils.data.Sampler):
    """Shuffles with a generator seeded by (seed, epoch) and yields (epoch, index) keys.

    accelerate calls set_epoch; the order then depends only on the seed and the epoch, the same on
    every process (accelerate shards the batches), so resuming can skip batches instead of replaying.
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        order = (torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
                 if self.shuffle else torch.arange(self.n))
        return iter([(self.epoch, int(i)) for i in order])


def check_data_dirs(cfg) -> None:
    """Fail before anything is written if a data folder is missing or holds no images."""
    if cfg.instance_data_dir:
        list_images(cfg.instance_data_dir, "--instance_data_dir")
    if cfg.train_data_dir:
        list_images(cfg.train_data_dir, "--train_data_dir")


def build_dataset(cfg) -> TrainDataset:
    """The training set described by the config (DreamBooth or captioned folder)."""
    if cfg.instance_data_dir:
        instances = ImageCaptionSet.from_folder(cfg.instance_data_dir, cfg.resolution, prompt=cfg.instance_prompt,
                                                what="--instance_data_dir")
    else:
        instances = ImageCaptionSet.from_folder(cfg.train_data_dir, cfg.resolution, captions=True,
                                                prompt=cfg.instance_prompt, image_column=cfg.image_column,
                                                caption_column=cfg.caption_column, what="--train_data_dir")
    classes = None
    if cfg.with_prior_preservation:
        classes = ImageCaptionSet.from_folder(cfg.class_data_dir, cfg.resolution, prompt=cfg.class_prompt,
                                              what="--class_data_dir")
        keep = cfg.num_class_images
        classes = ImageCaptionSet(classes.paths[:keep], classes.images[:keep], classes.sizes[:keep],
                                  classes.prompts[:keep])
    return TrainDataset(instances, Crop(cfg.resolution, cfg.center_crop, cfg.random_flip, cfg.seed), classes)


def build_dataloader(dataset: TrainDataset, cfg) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(dataset, batch_size=cfg.train_batch_size,
                                       sampler=EpochSampler(len(dataset), cfg.seed), collate_fn=collate,
                                       num_workers=cfg.dataloader_num_workers)
