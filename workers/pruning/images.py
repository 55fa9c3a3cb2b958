"""Image-text datasets: builtin:digits (scikit-learn's 8x8 digits with captions) and uploaded .zip files.

builtin:digits is split once, deterministically: within each digit class the indices are shuffled by a
generator seeded with SPLIT_SEED and the first round(20%) of them are held out. The held-out split is for
zero-shot evaluation only; training and calibration use the train split.

An uploaded dataset is a .zip holding data.jsonl (one {"image": path inside the zip, "text": caption}
object a line) and the PNG/JPEG images it names. It is read in memory, never extracted, and refused with a
readable ValueError when it looks hostile: too many members, too many bytes, absurd compression ratios,
absolute or parent-relative paths, symlinks, or images whose header claims too many pixels. The limits are
the caller's (the worker passes the ones the API checked the upload with, from the same settings); the
vocabulary's defaults otherwise.
"""

from __future__ import annotations

import io
import json
import re
import stat
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path, PurePosixPath

import torch
import torch.nn.functional as F

from prunekit.vocabulary import ARCHIVE_LIMITS, DIGITS, ArchiveLimits
from workers.pruning.spec import JobError

BUILTIN_DIGITS = DIGITS
DIGIT_TEMPLATE = "a photo of the digit {}"
SPLITS = ("train", "heldout")
HELDOUT_FRACTION = 0.2
SPLIT_SEED = 0
DIGITS_MAX_VALUE = 16.0  # load_digits counts inked cells of a 4x4 block: 0..16
# OpenAI CLIP's normalisation, which every CLIP preprocessor config repeats.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DATA_FILE = "data.jsonl"
IMAGE_FORMATS = ("PNG", "JPEG")
_DRIVE = re.compile(r"^[A-Za-z]:")


@dataclass(frozen=True)
class ImageTextSet:
    """Images with one caption each. An image is [C, H, W] with C = 1 (grey) or 3 (RGB), either float32
    in [0, 1] or uint8 in [0, 255]; labels are class indices where the set has classes (digits)."""

    images: Sequence[torch.Tensor]
    texts: list[str]
    labels: list[int] | None = None

    def __len__(self) -> int:
        return len(self.texts)


# ---- builtin:digits ----------------------------------------------------------------------------------


def digit_prompts(classes: Sequence[int] = range(10)) -> list[str]:
    return [DIGIT_TEMPLATE.format(label) for label in classes]


@lru_cache(maxsize=1)
def _digits() -> tuple[torch.Tensor, tuple[int, ...]]:
    from sklearn.datasets import load_digits  # ships its data: no download

    digits = load_digits()
    images = torch.from_numpy(digits.images).to(torch.float32).div_(DIGITS_MAX_VALUE).unsqueeze(1)
    return images, tuple(int(label) for label in digits.target)


def stratified_split(labels: Sequence[int], heldout_fraction: float = HELDOUT_FRACTION,
                     seed: int = SPLIT_SEED) -> tuple[list[int], list[int]]:
    """(train, heldout) indices, each sorted: per class, a seeded shuffle and the first round(f*n) held out."""
    generator = torch.Generator().manual_seed(seed)
    train: list[int] = []
    heldout: list[int] = []
    for label in sorted(set(labels)):  # a fixed class order keeps the generator's draws fixed
        members = [index for index, value in enumerate(labels) if value == label]
        order = torch.randperm(len(members), generator=generator).tolist()
        cut = round(heldout_fraction * len(members))
        heldout += [members[position] for position in order[:cut]]
        train += [members[position] for position in order[cut:]]
    return sorted(train), sorted(heldout)


def digits_split(split: str) -> ImageTextSet:
    """The train or heldout part of builtin:digits: images [N, 1, 8, 8] in [0, 1], captions, labels."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    images, labels = _digits()
    train, heldout = stratified_split(labels)
    indices = train if split == "train" else heldout
    chosen = [labels[index] for index in indices]
    return ImageTextSet(images=images[indices], texts=digit_prompts(chosen), labels=chosen)


def is_image_text(dataset: str) -> bool:
    """builtin:digits or an uploaded image-text archive (the worker hands the engine its .zip path)."""
    return dataset == BUILTIN_DIGITS or (not dataset.startswith("builtin:") and Path(dataset).suffix.lower() == ".zip")


def load_image_text(dataset: str, split: str = "train", limits: ArchiveLimits = ARCHIVE_LIMITS) -> ImageTextSet:
    """builtin:digits (either split), or an uploaded .zip (used whole: an upload has no held-out part) read within
    `limits`."""
    if dataset == BUILTIN_DIGITS:
        return digits_split(split)
    if dataset.startswith("builtin:"):
        raise JobError("dataset_error", f"Unknown built-in image-text dataset {dataset!r}; available: "
                                        f"{BUILTIN_DIGITS}.")
    path = Path(dataset)
    if path.suffix.lower() != ".zip" or not path.is_file():
        raise JobError("dataset_error", f"Image-text dataset {path.name!r} is not an existing .zip file.")
    try:
        return read_image_text_zip(path, limits)
    except ValueError as exc:
        raise JobError("dataset_error", f"{path.name}: {exc}") from exc


# ---- pixel values ------------------------------------------------------------------------------------


def pixel_values(images: Sequence[torch.Tensor], image_size: int, mean: Sequence[float] = CLIP_MEAN,
                 std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """CLIP's preprocessing in plain torch: [N, 3, image_size, image_size] float32.

    Like CLIP's processor: shortest edge resized to image_size (bicubic), centre crop, grey copied to three
    channels, then (x - mean) / std per channel.
    """
    if len(images) == 0:
        return torch.empty(0, 3, image_size, image_size)
    if isinstance(images, torch.Tensor) and images.dim() == 4:
        batch = _resized(_as_unit_float(images), image_size)  # one call for a same-sized stack
    else:
        batch = torch.cat([_resized(_as_unit_float(image).unsqueeze(0), image_size) for image in images])
    batch = batch.expand(-1, 3, -1, -1) if batch.shape[1] == 1 else batch
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return ((batch - mean_t) / std_t).contiguous()


def _as_unit_float(images: torch.Tensor) -> torch.Tensor:
    if images.shape[-3] not in (1, 3):
        raise ValueError(f"images need 1 or 3 channels, got {images.shape[-3]}")
    if images.dtype == torch.uint8:
        return images.to(torch.float32) / 255.0
    return images.to(torch.float32)


def _resized(batch: torch.Tensor, size: int) -> torch.Tensor:
    height, width = batch.shape[-2:]
    scale = size / min(height, width)
    new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
    if (new_h, new_w) != (height, width):
        # antialias matters only when shrinking; bicubic overshoots, so clamp back into [0, 1]
        batch = F.interpolate(batch, size=(new_h, new_w), mode="bicubic", align_corners=False,
                              antialias=True).clamp_(0.0, 1.0)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return batch[..., top:top + size, left:left + size]


# ---- uploaded .zip -----------------------------------------------------------------------------------


def read_image_text_zip(path: Path, limits: ArchiveLimits = ARCHIVE_LIMITS) -> ImageTextSet:
    """Images (uint8 RGB [3, H, W]) and captions from an uploaded .zip; ValueError when it is unsafe or bad."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ValueError(f"not a readable zip file ({exc})") from exc
    with archive:
        members = _checked_members(archive, limits)
        data_name = _data_file(members)
        base = PurePosixPath(data_name).parent
        try:
            lines = _read_member(archive, members[data_name], limits).decode("utf-8").splitlines()
        except UnicodeDecodeError as exc:
            raise ValueError(f"{data_name} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
        images: list[torch.Tensor] = []
        texts: list[str] = []
        total_pixels = 0
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            image_name, text = _record(line, number, limits)
            member = members.get(str(base / _safe_path(image_name, f"{DATA_FILE} line {number}")))
            if member is None:
                raise ValueError(f"{DATA_FILE} line {number}: image {image_name!r} is not in the zip")
            image = _decode_image(_read_member(archive, member, limits), image_name, limits)
            total_pixels += image.shape[1] * image.shape[2]
            if total_pixels > limits.max_total_pixels:
                raise ValueError(f"the images hold more than {limits.max_total_pixels} pixels in all")
            images.append(image)
            texts.append(text)
    if not texts:
        raise ValueError(f"{DATA_FILE} has no records")
    return ImageTextSet(images=images, texts=texts)


def _checked_members(archive: zipfile.ZipFile, limits: ArchiveLimits) -> dict[str, zipfile.ZipInfo]:
    """Every member vetted from the central directory before a single byte is decompressed."""
    infos = archive.infolist()
    if len(infos) > limits.max_members:
        raise ValueError(f"the zip has {len(infos)} members; at most {limits.max_members} are allowed")
    total = 0
    members: dict[str, zipfile.ZipInfo] = {}
    for info in infos:
        name = str(_safe_path(info.filename, "zip member"))
        if stat.S_ISLNK(info.external_attr >> 16):
            raise ValueError(f"zip member {info.filename!r} is a symbolic link")
        if info.is_dir():
            continue
        if info.file_size > limits.max_member_bytes:
            raise ValueError(f"zip member {info.filename!r} is {info.file_size} bytes uncompressed; "
                             f"at most {limits.max_member_bytes} are allowed")
        ratio = info.file_size / max(info.compress_size, 1)
        if info.file_size > limits.ratio_floor_bytes and ratio > limits.max_ratio:
            raise ValueError(f"zip member {info.filename!r} expands {ratio:.0f}x (a zip bomb?); "
                             f"at most {limits.max_ratio:.0f}x is allowed")
        total += info.file_size
        if total > limits.max_total_bytes:
            raise ValueError(f"the zip expands to more than {limits.max_total_bytes} bytes")
        if name in members:
            raise ValueError(f"zip member {info.filename!r} appears twice")
        members[name] = info
    return members


def _safe_path(name: str, what: str) -> PurePosixPath:
    """A relative path with no '..': nothing is extracted, but a name that climbs out is a sign of malice."""
    unified = name.replace("\\", "/")
    if unified.startswith("/") or _DRIVE.match(unified):
        raise ValueError(f"{what} {name!r} is an absolute path")
    path = PurePosixPath(unified)
    if ".." in path.parts:
        raise ValueError(f"{what} {name!r} climbs out of the archive ('..')")
    if "\x00" in unified or not path.parts:
        raise ValueError(f"{what} {name!r} is not a valid path")
    return path


def _data_file(members: dict[str, zipfile.ZipInfo]) -> str:
    """data.jsonl at the root, or in the one folder an archiving tool wrapped everything in."""
    candidates = sorted((name for name in members if PurePosixPath(name).name == DATA_FILE),
                        key=lambda name: (len(PurePosixPath(name).parts), name))
    if not candidates:
        raise ValueError(f"the zip has no {DATA_FILE}")
    if len(candidates) > 1 and len(PurePosixPath(candidates[0]).parts) == len(PurePosixPath(candidates[1]).parts):
        raise ValueError(f"the zip has several {DATA_FILE} files at the same depth: {candidates[:2]}")
    return candidates[0]


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, limits: ArchiveLimits) -> bytes:
    # Declared sizes may lie; read at most one byte past the limit so a liar cannot expand unbounded.
    try:
        with archive.open(info) as stream:
            data = stream.read(limits.max_member_bytes + 1)
    except (zipfile.BadZipFile, OSError, EOFError, RuntimeError) as exc:
        raise ValueError(f"zip member {info.filename!r} is unreadable ({exc})") from exc
    if len(data) > limits.max_member_bytes:
        raise ValueError(f"zip member {info.filename!r} expands past {limits.max_member_bytes} bytes")
    return data


def _record(line: str, number: int, limits: ArchiveLimits) -> tuple[str, str]:
    where = f"{DATA_FILE} line {number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where} is not valid JSON ({exc.msg})") from exc
    if not isinstance(record, dict):
        raise ValueError(f"{where} is not a JSON object")
    image, text = record.get("image"), record.get("text")
    if not isinstance(image, str) or not image:
        raise ValueError(f"{where} has no string field \"image\"")
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{where} has no non-empty string field \"text\"")
    if len(text) > limits.max_text_chars:
        raise ValueError(f"{where}: the text is {len(text)} characters; at most {limits.max_text_chars}")
    return image, text


def _decode_image(data: bytes, name: str, limits: ArchiveLimits) -> torch.Tensor:
    """uint8 RGB [3, H, W]; the pixel count is checked from the header, before any pixel is decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # Pillow's own bomb warning fires between its limit and twice it; our smaller cap decides instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        width, height = image.size
        if width * height > limits.max_image_pixels:
            raise ValueError(f"image {name!r} is {width}x{height} pixels; at most {limits.max_image_pixels} "
                             f"pixels are allowed")
        rgb = image.convert("RGB")
    except Image.DecompressionBombError as exc:
        raise ValueError(f"image {name!r} is too large to decode safely ({exc})") from exc
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"image {name!r} is not a readable PNG or JPEG ({exc})") from exc
    # bytearray: torch.frombuffer wants a writable buffer
    pixels = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
    return pixels.view(height, width, 3).permute(2, 0, 1).contiguous()
