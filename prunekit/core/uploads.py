"""Checks an uploaded dataset before it is stored: its kind, its record count and, for archives, its safety.

Pure standard library (the API never imports torch): images are decoded only by the worker. Everything is
read in a streaming way so a hostile upload costs at most its (already capped) size.
"""

from __future__ import annotations

import json
import stat
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

TEXT_SUFFIXES = (".txt", ".jsonl")
ARCHIVE_SUFFIX = ".zip"
ARCHIVE_INDEX = "data.jsonl"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class UploadLimits:
    max_records: int
    max_zip_members: int
    max_zip_uncompressed_bytes: int
    # A member expanding more than this many times its stored size is treated as a zip bomb.
    max_compression_ratio: int = 200


@dataclass(frozen=True)
class CheckedUpload:
    kind: str  # "text" | "image-text"
    num_records: int
    stored_name: str  # data.txt | data.jsonl | data.zip: the name the worker reads it by


class InvalidUpload(ValueError):
    """The upload is refused; the message says why in words a user can act on."""


def check_upload(path: Path, filename: str, limits: UploadLimits) -> CheckedUpload:
    suffix = PurePosixPath(filename).suffix.lower()
    if suffix == ".txt":
        return CheckedUpload("text", _count_text_records(path, limits), "data.txt")
    if suffix == ".jsonl":
        return CheckedUpload("text", _count_jsonl_records(path, limits, "text"), "data.jsonl")
    if suffix == ARCHIVE_SUFFIX:
        return CheckedUpload("image-text", _check_archive(path, limits), "data.zip")
    raise InvalidUpload(f"{filename!r} is not a .txt, .jsonl (a \"text\" field per line) or image-text .zip file.")


def _count_text_records(path: Path, limits: UploadLimits) -> int:
    """Records of a .txt file are its non-empty lines."""
    return _count_lines(path, limits, lambda line, number: None, "the file holds no text.")


def _count_jsonl_records(path: Path, limits: UploadLimits, *fields: str) -> int:
    return _count_lines(path, limits, lambda line, number: _check_record(line, number, fields),
                        "the file holds no records.")


def _count_lines(path: Path, limits: UploadLimits, check: Callable[[str, int], object], empty: str) -> int:
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


def _check_archive(path: Path, limits: UploadLimits) -> int:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise InvalidUpload(f"the archive cannot be read as a zip file ({exc}).") from None
    with archive:
        members = archive.infolist()
        if len(members) > limits.max_zip_members:
            raise InvalidUpload(f"the archive has {len(members)} entries; at most {limits.max_zip_members}.")
        names = {_check_member(m, limits) for m in members}
        total = sum(m.file_size for m in members)
        if total > limits.max_zip_uncompressed_bytes:
            raise InvalidUpload(f"the archive expands to {total} bytes; at most "
                                f"{limits.max_zip_uncompressed_bytes}.")
        if ARCHIVE_INDEX not in names:
            raise InvalidUpload(f"the archive has no {ARCHIVE_INDEX} at its top level "
                                "(one {\"image\": <path in the zip>, \"text\": <caption>} per line).")
        count = 0
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
                count += 1
                _check_count(count, limits)
    if count == 0:
        raise InvalidUpload(f"{ARCHIVE_INDEX} holds no records.")
    return count


def _check_member(member: zipfile.ZipInfo, limits: UploadLimits) -> str:
    name = member.filename
    parts = PurePosixPath(name).parts
    if name.startswith(("/", "\\")) or ".." in parts or "\\" in name or (parts and ":" in parts[0]):
        raise InvalidUpload(f"the archive entry {name!r} points outside the archive.")
    if stat.S_ISLNK(member.external_attr >> 16):
        raise InvalidUpload(f"the archive entry {name!r} is a symbolic link; links are not accepted.")
    if member.flag_bits & 0x1:
        raise InvalidUpload(f"the archive entry {name!r} is encrypted.")
    if member.file_size > limits.max_compression_ratio * max(member.compress_size, 1):
        raise InvalidUpload(f"the archive entry {name!r} expands {member.file_size} bytes from "
                            f"{member.compress_size}: refused as a likely zip bomb.")
    return name


def _decode(raw: bytes, number: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidUpload(f"line {number} is not UTF-8 text.") from None


def _check_count(count: int, limits: UploadLimits) -> None:
    if count > limits.max_records:
        raise InvalidUpload(f"more than {limits.max_records} records.")
