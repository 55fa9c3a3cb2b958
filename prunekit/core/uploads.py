"""Checks an uploaded dataset before it is stored: its kind, its record count and, for archives, its safety.

Pure standard library (the API never imports torch): images are decoded only by the worker. Everything is
read in a streaming way so a hostile upload costs at most its (already capped) size.
"""

from __future__ import annotations

import json
import stat
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from prunekit.vocabulary import TASK, ArchiveLimits, task_record_problem

TEXT_SUFFIXES = (".txt", ".jsonl")
ARCHIVE_SUFFIX = ".zip"
ARCHIVE_INDEX = "data.jsonl"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class CheckedUpload:
    kind: str  # "text" | "image-text" | "task"
    num_records: int
    stored_name: str  # data.txt | data.jsonl | data.zip: the name the worker reads it by


class InvalidUpload(ValueError):
    """The upload is refused; the message says why in words a user can act on."""


def check_upload(path: Path, filename: str, limits: ArchiveLimits) -> CheckedUpload:
    suffix = PurePosixPath(filename).suffix.lower()
    if suffix == ".txt":
        return CheckedUpload("text", _count_text_records(path, limits), "data.txt")
    if suffix == ".jsonl" and _is_task_file(path):
        return CheckedUpload(TASK, _count_task_items(path, limits), "data.jsonl")
    if suffix == ".jsonl":
        return CheckedUpload("text", _count_jsonl_records(path, limits, "text"), "data.jsonl")
    if suffix == ARCHIVE_SUFFIX:
        return CheckedUpload("image-text", _check_archive(path, limits), "data.zip")
    raise InvalidUpload(f"{filename!r} is not a .txt, .jsonl (a \"text\" field per line, or a task: \"context\", "
                        "\"choices\" and \"answer\") or image-text .zip file.")


# --- task files (multiple-choice items for evaluation.tasks) ---------------------------------------
_TASK_FIELDS = ("context", "choices", "answer")


def _is_task_file(path: Path) -> bool:
    """A .jsonl whose first record has task fields and no "text" is a task file; anything else is read as text
    (and a first line that is no JSON object is refused there)."""
    with path.open("rb") as fh:
        for raw in fh:
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except ValueError:
                return False
            return isinstance(record, dict) and "text" not in record and any(f in record for f in _TASK_FIELDS)
    return False


def _count_task_items(path: Path, limits: ArchiveLimits) -> int:
    return _count_lines(path, limits, _check_task_item, "the file holds no items.")


def _check_task_item(line: str, number: int) -> None:
    if not line.strip():
        return
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InvalidUpload(f"line {number} is not valid JSON ({exc.msg}).") from None
    problem = task_record_problem(record)
    if problem is not None:
        raise InvalidUpload(f"line {number}: {problem}.")


def _count_text_records(path: Path, limits: ArchiveLimits) -> int:
    """Records of a .txt file are its non-empty lines."""
    return _count_lines(path, limits, lambda line, number: None, "the file holds no text.")


def _count_jsonl_records(path: Path, limits: ArchiveLimits, *fields: str) -> int:
    return _count_lines(path, limits, lambda line, number: _check_record(line, number, fields),
                        "the file holds no records.")


def _count_lines(path: Path, limits: ArchiveLimits, check: Callable[[str, int], object], empty: str) -> int:
    """Non-empty lines, each decoded as UTF-8 and checked, counted up to the record cap."""
    count = 0
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            line = _decode(raw, number)
            check(line, number)
            if line.strip():
                count += 1
                _check_count(count, limits)
    if count == 0:
        raise InvalidUpload(empty)
    return count


def _check_record(line: str, number: int, fields: tuple[str, ...]) -> dict[str, str] | None:
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InvalidUpload(f"line {number} is not valid JSON ({exc.msg}).") from None
    if not isinstance(record, dict):
        raise InvalidUpload(f"line {number} is not a JSON object.")
    for field in fields:
        if not isinstance(record.get(field), str) or not record[field].strip():
            raise InvalidUpload(f"line {number} has no non-empty string field {field!r}.")
    return record


def _check_archive(path: Path, limits: ArchiveLimits) -> int:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise InvalidUpload(f"the archive cannot be read as a zip file ({exc}).") from None
    with archive:
        members = archive.infolist()
        if len(members) > limits.max_members:
            raise InvalidUpload(f"the archive has {len(members)} entries; at most {limits.max_members}.")
        names: set[str] = set()
        for member in members:
            name = _check_member(member, limits)
            if name in names:  # the worker could not tell which of the two a record means
                raise InvalidUpload(f"the archive entry {name!r} appears twice.")
            names.add(name)
        total = sum(m.file_size for m in members)
        if total > limits.max_total_bytes:
            raise InvalidUpload(f"the archive expands to {total} bytes; at most "
                                f"{limits.max_total_bytes}.")
        if ARCHIVE_INDEX not in names:
            raise InvalidUpload(f"the archive has no {ARCHIVE_INDEX} at its top level "
                                "(one {\"image\": <path in the zip>, \"text\": <caption>} per line).")
        count = total_pixels = 0
        pixels_of: dict[str, int] = {}  # an image named by several records is read once, counted each time
        with archive.open(ARCHIVE_INDEX) as fh:
            for number, raw in enumerate(fh, start=1):
                record = _check_record(_decode(raw, number), number, ("image", "text"))
                if record is None:
                    continue
                image = record["image"]
                if image not in names:
                    raise InvalidUpload(f"line {number} names image {image!r}, which is not in the archive.")
                if PurePosixPath(image).suffix.lower() not in IMAGE_SUFFIXES:
                    raise InvalidUpload(f"line {number}: {image!r} is not a PNG or JPEG file.")
                if len(record["text"]) > limits.max_text_chars:
                    raise InvalidUpload(f"line {number}: the text is {len(record['text'])} characters; at most "
                                        f"{limits.max_text_chars}.")
                if image not in pixels_of:
                    pixels_of[image] = _image_pixels(archive, image, number, limits)
                # The worker decodes every record's image: all of them together must fit its memory bound.
                total_pixels += pixels_of[image]
                if total_pixels > limits.max_total_pixels:
                    raise InvalidUpload(f"the images hold more than {limits.max_total_pixels} pixels in all.")
                count += 1
                _check_count(count, limits)
    if count == 0:
        raise InvalidUpload(f"{ARCHIVE_INDEX} holds no records.")
    return count


def _image_pixels(archive: zipfile.ZipFile, image: str, number: int, limits: ArchiveLimits) -> int:
    """Width x height from the image's header, as the worker's decoder reads it, without decoding a pixel."""
    with archive.open(image) as stream:
        size = _image_size(stream)
    if size is None:
        raise InvalidUpload(f"line {number}: {image!r} is not a PNG or JPEG file.")
    width, height = size
    if width * height > limits.max_image_pixels:
        raise InvalidUpload(f"line {number}: {image!r} is {width}x{height} pixels; at most "
                            f"{limits.max_image_pixels}.")
    return width * height


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers (which carry the size); C4, C8 and CC are other segments in the same range.
_JPEG_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})


def _image_size(stream: IO[bytes]) -> tuple[int, int] | None:
    """(width, height) of a PNG (its IHDR chunk) or a JPEG (its first frame header); None for anything else.
    Reads only up to the header: a zip member's read(n) answers n bytes unless the member ends first."""

    def take(n: int) -> bytes | None:
        chunk = stream.read(n)
        return chunk if len(chunk) == n else None

    start = take(2)
    if start == _PNG_SIGNATURE[:2]:
        head = take(22)
        if head is None or not (start + head).startswith(_PNG_SIGNATURE) or head[10:14] != b"IHDR":
            return None
        width, height = struct.unpack(">II", head[14:22])
        return width, height
    if start != b"\xff\xd8":
        return None
    while take(1) == b"\xff":
        marker = take(1)
        while marker == b"\xff":  # fill bytes before a marker
            marker = take(1)
        if marker is None or marker[0] in (0xD9, 0xDA):  # end of image, or the pixels start: no frame header
            return None
        if marker[0] in _JPEG_STANDALONE:
            continue
        length = take(2)
        if length is None or (size := struct.unpack(">H", length)[0]) < 2:
            return None
        if marker[0] in _JPEG_FRAMES:
            frame = take(5)  # precision, height, width
            if frame is None:
                return None
            height, width = struct.unpack(">HH", frame[1:5])
            return width, height
        if take(size - 2) is None:
            return None
    return None


def _check_member(member: zipfile.ZipInfo, limits: ArchiveLimits) -> str:
    name = member.filename
    parts = PurePosixPath(name).parts
    if name.startswith(("/", "\\")) or ".." in parts or "\\" in name or (parts and ":" in parts[0]):
        raise InvalidUpload(f"the archive entry {name!r} points outside the archive.")
    if stat.S_ISLNK(member.external_attr >> 16):
        raise InvalidUpload(f"the archive entry {name!r} is a symbolic link; links are not accepted.")
    if member.flag_bits & 0x1:
        raise InvalidUpload(f"the archive entry {name!r} is encrypted.")
    if member.file_size > limits.max_member_bytes:
        raise InvalidUpload(f"the archive entry {name!r} expands to {member.file_size} bytes; at most "
                            f"{limits.max_member_bytes} for one entry.")
    # Stricter than the worker, which lets a member under ratio_floor_bytes expand further: what passes here
    # passes there.
    if member.file_size > limits.max_ratio * max(member.compress_size, 1):
        raise InvalidUpload(f"the archive entry {name!r} expands {member.file_size} bytes from "
                            f"{member.compress_size}: refused as a likely zip bomb.")
    return name


def _decode(raw: bytes, number: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidUpload(f"line {number} is not UTF-8 text.") from None


def _check_count(count: int, limits: ArchiveLimits) -> None:
    if count > limits.max_records:
        raise InvalidUpload(f"more than {limits.max_records} records.")
