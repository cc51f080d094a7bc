"""Training images: DreamBooth folders, captioned image folders and kohya's `<repeats>_<caption>` folders,
cropped, flipped and captioned reproducibly.

Images are decoded once, at load time, and kept resized to cover their training size (the square
--resolution, or with --enable_bucket the aspect-ratio bucket of buckets.py): every file is checked up front
(corrupt ones are named and skipped) and the training loop never waits on JPEG decoding.

Random crop, flip, caption dropout and tag shuffling are a pure function of (seed, epoch, index): the sampler
hands the dataset `(epoch, index)` keys. So augmentation does not depend on worker processes, on prefetching,
or on where a run was resumed, and a 2-process run sees exactly the images of a 1-process run.
"""

from __future__ import annotations

import bisect
import csv
import io
import json
import re
import warnings
from collections import Counter
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from PIL import Image, ImageOps

from .buckets import Buckets, describe

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
# Files that sit beside images by design: not worth a warning.
_SIDECARS = {".txt", ".caption", ".jsonl", ".json", ".csv", ".md"}
CAPTION_SUFFIXES = (".txt", ".caption")  # sidecar caption files, in order of preference
KOHYA_FOLDER = re.compile(r"^(\d+)_(.+)$")  # kohya's "<repeats>_<caption or class>", e.g. "10_sks dog"
MAX_REPEATS = 10_000  # kohya folder repeats above this are a typo (an epoch of millions of steps)


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
    # datasets' imagefolder layout: a metadata file may name images in subfolders (images/0001.png)
    nested = (folder / "metadata.jsonl").is_file() or (folder / "metadata.csv").is_file()
    files = sorted(p for p in (folder.rglob("*") if nested else folder.iterdir())
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    other = [p.relative_to(folder).as_posix() for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS | _SIDECARS]
    if other:
        warnings.warn(f"{what} {str(folder)!r}: skipping {len(other)} non-image file(s): "
                      f"{', '.join(other[:5])}{' ...' if len(other) > 5 else ''}", stacklevel=2)
    if not images:
        raise DataError(f"{what} {str(folder)!r} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}); "
                        "add some or fix the path")
    return images


def _upright_size(im: Image.Image) -> tuple[int, int]:
    """(width, height) as displayed, i.e. after the EXIF orientation is applied."""
    w, h = im.size
    return (h, w) if im.getexif().get(0x0112, 1) in (5, 6, 7, 8) else (w, h)  # a 90 degree turn


def image_size(path: Path) -> tuple[int, int] | None:
    """(width, height) of an image file from its header, or None if it cannot be read."""
    try:
        with Image.open(path) as im:
            return _upright_size(im)
    except Exception:  # noqa: BLE001 - PIL raises many types for bad files
        return None


def bucket_counts(images, resolution: int, min_bucket_reso: int = 256, max_bucket_reso: int = 1024,
                  bucket_reso_steps: int = 64, bucket_no_upscale: bool = False) -> dict[tuple[int, int], int]:
    """How many images go to each bucket (width, height); `images` are file paths or (width, height) sizes.
    Files are read for their header only (EXIF rotation counted); unreadable ones are left out."""
    buckets = Buckets(resolution, min_bucket_reso, max_bucket_reso, bucket_reso_steps, bucket_no_upscale)
    counts = Counter()
    for item in images:
        size = image_size(Path(item)) if isinstance(item, (str, Path)) else tuple(item)
        if size is not None:
            counts[buckets.select(*size)] += 1
    return dict(sorted(counts.items()))


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB with the right brightness: 16/32-bit integer and float images are scaled to
    0..255 (a plain convert("RGB") clips them, so a 16-bit photo turns white), and transparent pixels are laid
    on white (convert would show whatever colour they hide, often black)."""
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        import numpy as np

        a = np.asarray(im, dtype=np.float64)
        peak = float(a.max(initial=0))
        # the value range the data was written in: 0..1 floats, 8 bits, 16 bits, else (32-bit data) its own
        top = 1.0 if im.mode == "F" and peak <= 1.0 else 255.0 if peak <= 255 else 65535.0 if peak <= 65535 else peak
        gray = np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if im.mode == "P" and "transparency" in im.info or im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def load_resized(path: Path, resolution: int, buckets: Buckets | None = None):
    """(RGB image resized to just cover its training size, original (h, w), training size (w, h)), or None if
    the file cannot be decoded. The training size is the square resolution, or the image's bucket."""
    try:
        with Image.open(path) as im:
            w, h = _upright_size(im)
            bw, bh = buckets.select(w, h) if buckets else (resolution, resolution)
            im.draft("RGB", (max(bw, bh),) * 2)  # JPEG: decode at reduced scale (much faster)
            im = to_rgb(ImageOps.exif_transpose(im))
            scale = max(bw / im.size[0], bh / im.size[1])
            new = (max(bw, round(im.size[0] * scale)), max(bh, round(im.size[1] * scale)))
            return im.resize(new, Image.Resampling.BICUBIC), (h, w), (bw, bh)
    except Exception:  # noqa: BLE001 - PIL raises many types for bad files
        return None


# Below this shorter side an image holds nothing to learn from (a 1x1 "photo" trains silently otherwise).
MIN_IMAGE_SIDE = 16


def load_images(paths: list[Path], resolution: int, what: str, buckets: Buckets | None = None):
    """(paths, images, original sizes, training sizes) of the usable files; corrupt and tiny ones are named in
    a warning, and images upscaled more than 2x to the training resolution get a warning too."""
    good, images, sizes, targets, bad, tiny, small = [], [], [], [], [], [], []
    for p in paths:
        loaded = load_resized(p, resolution, buckets)
        if loaded is None:
            bad.append(p.name)
        elif min(loaded[1]) < MIN_IMAGE_SIDE:
            tiny.append(f"{p.name} ({loaded[1][1]}x{loaded[1][0]})")
        else:
            (h, w), (bw, bh) = loaded[1], loaded[2]
            if max(bw / w, bh / h) > 2:  # not with --bucket_no_upscale: its buckets fit in the image
                small.append(f"{p.name} ({w}x{h})")
            good.append(p)
            images.append(loaded[0])
            sizes.append(loaded[1])
            targets.append(loaded[2])
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
    return good, images, sizes, targets


# --- captions --------------------------------------------------------------------------------------------
def read_captions(folder: Path, images: list[Path], image_column: str, caption_column: str,
                  default: str | None = None) -> list[str]:
    """Caption per image from metadata.jsonl / metadata.csv (datasets' imagefolder layout) or a <name>.txt /
    <name>.caption sidecar, else `default`."""
    table: dict[str, str] = {}
    jsonl, csv_path = folder / "metadata.jsonl", folder / "metadata.csv"
    rows = []
    if jsonl.is_file():
        for n, line in enumerate(_read_utf8(jsonl).splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    raise DataError(f"{jsonl}: line {n} is not valid JSON") from None
    elif csv_path.is_file():
        rows = list(csv.DictReader(io.StringIO(_read_utf8(csv_path), newline="")))
    source = jsonl if jsonl.is_file() else csv_path
    for n, row in enumerate(rows, 1):
        if image_column not in row or caption_column not in row:
            raise DataError(f"{source}: row {n} lacks column {image_column!r} or {caption_column!r}; set "
                            "--image_column / --caption_column to the names used in the file")
        table[Path(str(row[image_column])).as_posix()] = str(row[caption_column])  # relative to the folder
    captions, empty = [], []
    for p in images:
        sidecars = [p.with_suffix(s) for s in CAPTION_SUFFIXES if p.with_suffix(s).is_file()]
        key = p.relative_to(folder).as_posix() if p.is_relative_to(folder) else p.name
        key = key if key in table else p.name  # (a bare file name also names an image in a subfolder)
        text = _read_utf8(sidecars[0]).strip() if sidecars and key not in table else None
        if text == "":  # an empty sidecar says nothing: the folder's caption stands (as kohya does)
            empty.append(sidecars[0].name)
        if key in table:
            captions.append(table[key])
        elif text:
            captions.append(text)
        elif default is not None:
            captions.append(default)
        else:
            raise DataError(f"no caption for {p}{' (its ' + empty[-1] + ' is empty)' if text == '' else ''}: add "
                            f"it to metadata.jsonl ({image_column!r}, {caption_column!r}) or write {p.stem}.txt, "
                            "or pass --instance_prompt as the default caption")
    if empty:
        warnings.warn(f"{folder}: {len(empty)} empty caption file(s) (first: {empty[0]}); those images train on "
                      f"the folder's caption {default!r}", stacklevel=2)
    return captions


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"caption file {str(path)!r} is not UTF-8 text; save it as UTF-8 or remove it") from None


def train_folders(folder: str | Path) -> list[tuple[Path, int, str | None]]:
    """(folder, repeats, folder caption) of a --train_data_dir: itself once, or with kohya's layout (every
    subfolder named `<repeats>_<caption>`, e.g. `10_sks dog`) each subfolder, repeated and captioned by name."""
    folder = Path(folder)
    subs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")) if folder.is_dir() else []
    named = {p: KOHYA_FOLDER.match(p.name) for p in subs}
    if not any(named.values()):
        return [(folder, 1, None)]
    other = [p.name for p, m in named.items() if not m]
    if other:
        raise DataError(f"--train_data_dir {str(folder)!r} mixes kohya <repeats>_<caption> subfolders with "
                        f"others ({', '.join(other)}); rename them like '10_sks dog' or move them out")
    loose = [p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    if loose:
        raise DataError(f"--train_data_dir {str(folder)!r} holds images ({', '.join(loose[:3])}) beside kohya "
                        "<repeats>_<caption> subfolders; move them into such a subfolder")
    zero = [p.name for p, m in named.items() if int(m[1]) == 0]
    if zero:
        raise DataError(f"--train_data_dir {str(folder)!r}: subfolder(s) {', '.join(zero)} repeat 0 times; "
                        "use a count >= 1 such as '1_'")
    huge = [p.name for p, m in named.items() if len(m[1]) > 9 or int(m[1]) > MAX_REPEATS]
    if huge:
        raise DataError(f"--train_data_dir {str(folder)!r}: subfolder {huge[0]!r} repeats its images more than "
                        f"{MAX_REPEATS:,} times; use a count such as '10_' (more steps: --max_train_steps)")
    return [(p, int(m[1]), m[2].strip()) for p, m in named.items()]


# --- augmentation ----------------------------------------------------------------------------------------
@dataclass
class Crop:
    resolution: int
    center_crop: bool
    random_flip: bool
    seed: int

    def __call__(self, image: Image.Image, epoch: int, index: int,
                 size: tuple[int, int] | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
        """A (width, height) = `size` crop (default: the square resolution) as a (C, H, W) tensor in [-1, 1],
        and the crop's top-left (y, x), as SDXL's micro-conditioning wants."""
        g = torch.Generator().manual_seed(hash((self.seed, epoch, index)) % 2**63)
        w, h = image.size
        cw, ch = size or (self.resolution, self.resolution)
        if self.center_crop:
            top, left = (h - ch) // 2, (w - cw) // 2
        else:
            top = int(torch.randint(0, h - ch + 1, (), generator=g))
            left = int(torch.randint(0, w - cw + 1, (), generator=g))
        image = image.crop((left, top, left + cw, top + ch))
        flip = self.random_flip and bool(torch.rand((), generator=g) < 0.5)
        if flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(ch, cw, 3)
        return x.permute(2, 0, 1).float().div(127.5).sub(1.0), (top, left)


@dataclass
class CaptionAugment:
    """kohya's --caption_dropout_rate (the caption becomes "") and --shuffle_caption (the comma-separated tags
    after the first --keep_tokens are shuffled), drawn per (seed, epoch, index)."""

    dropout_rate: float = 0.0
    shuffle: bool = False
    keep_tokens: int = 0
    seed: int = 0

    def __call__(self, caption: str, epoch: int, index: int) -> str:
        if not self.dropout_rate and not self.shuffle:
            return caption
        g = torch.Generator().manual_seed(hash((self.seed, epoch, index, 1)) % 2**63)  # not the crop's stream
        if self.dropout_rate and float(torch.rand((), generator=g)) < self.dropout_rate:
            return ""
        if self.shuffle:
            tags = [t.strip() for t in caption.split(",")]
            kept, rest = tags[:self.keep_tokens], tags[self.keep_tokens:]
            caption = ", ".join(kept + [rest[i] for i in torch.randperm(len(rest), generator=g)])
        return caption


# --- datasets --------------------------------------------------------------------------------------------
@dataclass
class ImageCaptionSet:
    """Loaded images with one prompt each (a DreamBooth folder, a class folder or a captioned folder).
    `sizes` are the originals' (h, w); `targets` the training sizes (w, h): square, or the image's bucket."""

    paths: list[Path]
    images: list[Image.Image]
    sizes: list[tuple[int, int]]
    prompts: list[str]
    targets: list[tuple[int, int]]

    def __len__(self) -> int:
        return len(self.images)

    def head(self, n: int) -> "ImageCaptionSet":
        return ImageCaptionSet(*(getattr(self, f.name)[:n] for f in fields(self)))

    @classmethod
    def join(cls, sets: list["ImageCaptionSet"]) -> "ImageCaptionSet":
        """Sets one after another."""
        return cls(*([x for s in sets for x in getattr(s, f.name)] for f in fields(cls)))

    @classmethod
    def from_folder(cls, folder, resolution, prompt=None, captions=False, image_column="file_name",
                    caption_column="text", what="data folder", buckets: Buckets | None = None) -> "ImageCaptionSet":
        paths = list_images(folder, what)
        paths, images, sizes, targets = load_images(paths, resolution, f"{what} {str(folder)!r}", buckets)
        if captions:
            prompts = read_captions(Path(folder), paths, image_column, caption_column, default=prompt)
        else:
            prompts = [prompt] * len(paths)
        return cls(paths, images, sizes, prompts, targets)


class Repeats:
    """kohya's folder repeats as an index map, without copying anything: position k of the repeated sequence
    is image `self(k)`. `counts[j]` images of part j follow one another, the part repeated `repeats[j]` times."""

    def __init__(self, counts: list[int], repeats: list[int]):
        self.counts = counts
        self.starts = [sum(counts[:j]) for j in range(len(counts))]  # first image of each part
        self.ends, total = [], 0  # end of each part in the repeated sequence
        for n, r in zip(counts, repeats):
            total += n * r
            self.ends.append(total)

    def __len__(self) -> int:
        return self.ends[-1] if self.ends else 0

    def __call__(self, k: int) -> int:
        j = bisect.bisect_right(self.ends, k)
        return self.starts[j] + (k - (self.ends[j - 1] if j else 0)) % self.counts[j]


class TrainDataset(torch.utils.data.Dataset):
    """Instance images (+ class images for prior preservation). Keys are (epoch, index) pairs.

    Length is max(instances, class images), as in diffusers' DreamBooth: every item pairs instance
    `i % n_instance` with class image `i % n_class`. `repeats` (kohya's folder repeats) maps an index of the
    repeated sequence to its image; by default every image once.
    """

    def __init__(self, instances: ImageCaptionSet, crop: Crop, classes: ImageCaptionSet | None = None,
                 captions: CaptionAugment | None = None, repeats: Repeats | None = None):
        self.instances, self.classes, self.crop = instances, classes, crop
        self.captions = captions or CaptionAugment()
        self.repeats = repeats or Repeats([len(instances)], [1])

    def __len__(self) -> int:
        return max(len(self.repeats), len(self.classes) if self.classes else 0)

    def targets(self) -> list[tuple[int, int]]:
        """The training size (w, h) of every instance index (the buckets of the batch sampler)."""
        return [self.instances.targets[self.repeats(k)] for k in range(len(self.repeats))]

    def __getitem__(self, key) -> dict:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        i = self.repeats(index % len(self.repeats))
        w, h = self.instances.targets[i]
        pixels, crop_top_left = self.crop(self.instances.images[i], epoch, index, (w, h))
        prompt = self.captions(self.instances.prompts[i], epoch, index)
        item = {"index": index, "pixel_values": pixels, "prompt": prompt,
                "original_size": self.instances.sizes[i], "crop_top_left": crop_top_left, "target_size": (h, w)}
        if self.classes is not None:
            j = index % len(self.classes)
            pixels, crop_top_left = self.crop(self.classes.images[j], epoch, index + 7919)
            item.update(class_pixel_values=pixels, class_prompt=self.classes.prompts[j],
                        class_original_size=self.classes.sizes[j], class_crop_top_left=crop_top_left,
                        class_target_size=(self.crop.resolution,) * 2)
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
            "crop_top_lefts": field("crop_top_left"),
            "target_sizes": field("target_size")}  # (h, w), SDXL's target-size conditioning


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


class BucketBatchSampler:
    """Batches of (epoch, index) keys that never mix buckets, in an order fixed by (seed, epoch).

    EpochSampler's permutation is grouped by bucket (keeping its order) and cut into global batches of
    batch_size x num_processes keys; the batches are then shuffled with a generator seeded by seed + epoch.
    Each global batch is yielded as num_processes consecutive per-process batches, so accelerate's
    BatchSamplerShard (which hands the k-th batch of every num_processes to process k) gives each process its
    part of the same global batch a 1-process run trains on; skip_first_batches skips whole batches as usual.
    On several processes a bucket's last batch is padded (from the same bucket) to split evenly.
    No `batch_size` attribute on purpose: accelerate then takes the batches, of varying size, as they are.
    """

    def __init__(self, buckets: list[tuple[int, int]], batch_size: int, seed: int, num_processes: int = 1):
        self.buckets, self.seed, self.num_processes = buckets, seed, num_processes
        self.global_batch = batch_size * num_processes
        self.sampler = EpochSampler(len(buckets), seed)  # accelerate's set_epoch reaches it as `.sampler`

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def _padded(self, n: int) -> int:
        return -(-n // self.num_processes) * self.num_processes

    def __len__(self) -> int:
        size = self.global_batch
        return sum(-(-self._padded(n) // size) for n in Counter(self.buckets).values()) * self.num_processes

    def __iter__(self):
        groups: dict[tuple[int, int], list] = {}
        for key in self.sampler:
            groups.setdefault(self.buckets[key[1]], []).append(key)
        size, p = self.global_batch, self.num_processes
        batches = []
        for keys in groups.values():
            keys = (keys * p)[:self._padded(len(keys))]
            batches += [keys[i:i + size] for i in range(0, len(keys), size)]
        order = torch.randperm(len(batches), generator=torch.Generator().manual_seed(self.seed + self.sampler.epoch))
        for b in order:
            batch = batches[b]
            part = len(batch) // p
            yield from (batch[k * part:(k + 1) * part] for k in range(p))


def check_data_dirs(cfg) -> None:
    """Fail before anything is written if a data folder is missing or holds no images."""
    if cfg.instance_data_dir:
        list_images(cfg.instance_data_dir, "--instance_data_dir")
    if cfg.train_data_dir:
        for folder, _, _ in train_folders(cfg.train_data_dir):
            list_images(folder, "--train_data_dir")


def build_dataset(cfg) -> TrainDataset:
    """The training set described by the config (DreamBooth, captioned folder or kohya folders); the class
    images of prior preservation come later (load_class_images), once missing ones are generated."""
    buckets = Buckets.from_config(cfg)
    if cfg.instance_data_dir:
        instances = ImageCaptionSet.from_folder(cfg.instance_data_dir, cfg.resolution, prompt=cfg.instance_prompt,
                                                what="--instance_data_dir", buckets=buckets)
        repeats = None
    else:
        folders = train_folders(cfg.train_data_dir)
        parts = [ImageCaptionSet.from_folder(folder, cfg.resolution, captions=True, prompt=caption or cfg.instance_prompt,
                                             image_column=cfg.image_column, caption_column=cfg.caption_column,
                                             what="--train_data_dir", buckets=buckets)
                 for folder, _, caption in folders]
        instances = ImageCaptionSet.join(parts)
        repeats = Repeats([len(s) for s in parts], [r for _, r, _ in folders])
    captions = CaptionAugment(cfg.caption_dropout_rate, cfg.shuffle_caption, cfg.keep_tokens, cfg.seed)
    crop = Crop(cfg.resolution, cfg.center_crop, cfg.random_flip, cfg.seed)
    dataset = TrainDataset(instances, crop, None, captions, repeats)
    if buckets is not None:
        from reflora_diffusion.logs import get_logger

        get_logger(__name__).info(describe(buckets, instances.targets))
    return dataset


def load_class_images(cfg) -> ImageCaptionSet:
    """The prior-preservation class images (--class_data_dir), at most --num_class_images."""
    return ImageCaptionSet.from_folder(cfg.class_data_dir, cfg.resolution, prompt=cfg.class_prompt,
                                       what="--class_data_dir").head(cfg.num_class_images)


def build_dataloader(dataset: TrainDataset, cfg, num_processes: int = 1) -> torch.utils.data.DataLoader:
    if cfg.enable_bucket:
        batches = BucketBatchSampler(dataset.targets(), cfg.train_batch_size, cfg.seed, num_processes)
        return torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate,
                                           num_workers=cfg.dataloader_num_workers)
    return torch.utils.data.DataLoader(dataset, batch_size=cfg.train_batch_size,
                                       sampler=EpochSampler(len(dataset), cfg.seed), collate_fn=collate,
                                       num_workers=cfg.dataloader_num_workers)
