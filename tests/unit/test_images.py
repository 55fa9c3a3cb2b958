"""builtin:digits, CLIP pixel values and the guarded reader of uploaded image-text .zip files."""

from __future__ import annotations

import io
import json
import stat
import struct
import zipfile
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

from prunekit.vocabulary import ArchiveLimits
from workers.pruning.images import (
    BUILTIN_DIGITS,
    CLIP_MEAN,
    CLIP_STD,
    digits_split,
    load_image_text,
    pixel_values,
    read_image_text_zip,
    stratified_split,
)
from workers.pruning.spec import JobError


def _png(width: int, height: int, colour: tuple[int, int, int] = (200, 10, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but that holds no pixel data: decoding it would fail."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def _zip(path: Path, members: dict[str, bytes], records: list[dict[str, str]] | None = None) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        if records is not None:
            archive.writestr("data.jsonl", "\n".join(json.dumps(record) for record in records) + "\n")
        for name, data in members.items():
            archive.writestr(name, data)
    return path


# ---- builtin:digits ----------------------------------------------------------------------------------


def test_digits_split_is_deterministic_disjoint_and_stratified() -> None:
    train, heldout = digits_split("train"), digits_split("heldout")
    assert len(train) + len(heldout) == 1797
    assert 355 <= len(heldout) <= 365  # 20% of each class, rounded per class
    assert train.images.shape[1:] == (1, 8, 8) and train.images.dtype == torch.float32
    assert float(train.images.min()) >= 0.0 and float(train.images.max()) == 1.0
    assert train.texts[0] == f"a photo of the digit {train.labels[0]}"
    for label in range(10):
        assert 0.15 < heldout.labels.count(label) / (train.labels.count(label) + heldout.labels.count(label)) < 0.25

    labels = [index % 10 for index in range(1797)]
    first, again = stratified_split(labels), stratified_split(labels)
    assert first == again
    assert set(first[0]).isdisjoint(first[1])
    assert sorted(first[0] + first[1]) == list(range(1797))
    assert stratified_split(labels, seed=1) != first

    assert torch.equal(digits_split("heldout").images, heldout.images)


def test_unknown_split_and_dataset_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown split"):
        digits_split("test")
    with pytest.raises(JobError, match="Unknown built-in"):
        load_image_text("builtin:cifar")
    with pytest.raises(JobError, match="not an existing .zip"):
        load_image_text(str(tmp_path / "missing.zip"))
    assert len(load_image_text(BUILTIN_DIGITS, "heldout")) == len(digits_split("heldout"))


# ---- pixel values ------------------------------------------------------------------------------------


def test_pixel_values_upsample_grey_to_three_normalised_channels() -> None:
    images = torch.zeros(2, 1, 8, 8)
    images[1] = 1.0
    values = pixel_values(images, 32)
    assert values.shape == (2, 3, 32, 32) and values.dtype == torch.float32
    mean, std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
    # Constant images stay constant through bicubic resizing: black and white map to (0|1 - mean) / std.
    assert torch.allclose(values[0, :, 5, 7], -mean / std, atol=1e-5)
    assert torch.allclose(values[1, :, 20, 3], (1 - mean) / std, atol=1e-5)


def test_pixel_values_of_mixed_sizes_match_a_centre_crop() -> None:
    wide = torch.zeros(3, 16, 32, dtype=torch.uint8)
    wide[:, :, 8:24] = 255  # the centre square is white, the sides black
    square = torch.full((3, 8, 8), 255, dtype=torch.uint8)
    values = pixel_values([wide, square], 16)
    assert values.shape == (2, 3, 16, 16)
    assert torch.allclose(values[0], values[1], atol=1e-5)  # the crop removed the black sides


# ---- uploaded .zip -----------------------------------------------------------------------------------


def test_zip_reader_reads_images_and_captions(tmp_path: Path) -> None:
    jpeg = io.BytesIO()
    Image.new("L", (12, 10), 128).save(jpeg, format="JPEG")
    path = _zip(tmp_path / "ok.zip", {"img/a.png": _png(4, 6), "img/b.jpg": jpeg.getvalue()},
                [{"image": "img/a.png", "text": "a red box"}, {"image": "img/b.jpg", "text": "a grey box"}])
    data = read_image_text_zip(path)
    assert data.texts == ["a red box", "a grey box"] and data.labels is None
    assert data.images[0].shape == (3, 6, 4) and data.images[0].dtype == torch.uint8
    assert data.images[0][:, 0, 0].tolist() == [200, 10, 30]
    assert data.images[1].shape == (3, 10, 12)  # grey JPEG converted to RGB
    assert pixel_values(data.images, 16).shape == (2, 3, 16, 16)
    assert len(load_image_text(str(path))) == 2


def test_zip_reader_accepts_one_wrapping_folder(tmp_path: Path) -> None:
    path = tmp_path / "wrapped.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("set/data.jsonl", json.dumps({"image": "a.png", "text": "x"}) + "\n")
        archive.writestr("set/a.png", _png(2, 2))
    assert read_image_text_zip(path).texts == ["x"]


@pytest.mark.parametrize("name", ["../evil.png", "/etc/evil.png", "img/../../evil.png", "C:/evil.png"])
def test_zip_reader_refuses_members_outside_the_archive(tmp_path: Path, name: str) -> None:
    path = _zip(tmp_path / "bad.zip", {name: _png(2, 2)}, [{"image": "a.png", "text": "x"}])
    with pytest.raises(ValueError, match="absolute path|climbs out"):
        read_image_text_zip(path)


def test_zip_reader_refuses_records_pointing_outside(tmp_path: Path) -> None:
    path = _zip(tmp_path / "bad.zip", {"a.png": _png(2, 2)}, [{"image": "../a.png", "text": "x"}])
    with pytest.raises(ValueError, match="line 1 .*climbs out"):
        read_image_text_zip(path)


def test_zip_reader_refuses_symlinks(tmp_path: Path) -> None:
    path = _zip(tmp_path / "link.zip", {"a.png": _png(2, 2)}, [{"image": "a.png", "text": "x"}])
    link = zipfile.ZipInfo("b.png")
    link.create_system = 3  # unix: the mode in the high bits of external_attr is honoured
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr(link, "/etc/passwd")
    with pytest.raises(ValueError, match="symbolic link"):
        read_image_text_zip(path)


def test_zip_reader_refuses_too_many_members(tmp_path: Path) -> None:
    members = {f"{index}.png": b"x" for index in range(10)}
    path = _zip(tmp_path / "many.zip", members, [{"image": "0.png", "text": "x"}])
    with pytest.raises(ValueError, match="11 members; at most 5"):
        read_image_text_zip(path, ArchiveLimits(max_members=5))


def test_zip_reader_refuses_a_zip_bomb(tmp_path: Path) -> None:
    # 4 MiB of zeros deflate to about 4 KiB: a thousandfold expansion, refused from the directory alone.
    path = _zip(tmp_path / "bomb.zip", {"a.png": bytes(4 << 20)}, [{"image": "a.png", "text": "x"}])
    with pytest.raises(ValueError, match="zip bomb"):
        read_image_text_zip(path)
    with pytest.raises(ValueError, match="expands to more than"):
        read_image_text_zip(path, ArchiveLimits(max_ratio=1e9, max_total_bytes=1 << 20))


def test_zip_reader_refuses_an_image_with_too_many_pixels(tmp_path: Path) -> None:
    # Headers that claim more pixels than allowed, with no pixel data: refused before any decoding.
    # 5000 x 5000 passes Pillow's own guard and meets ours; 100000 x 100000 trips Pillow's first.
    for side, message in ((5_000, "5000x5000 pixels"), (100_000, "too large to decode safely")):
        path = _zip(tmp_path / f"huge{side}.zip", {"a.png": _png_header_only(side, side)},
                    [{"image": "a.png", "text": "x"}])
        with pytest.raises(ValueError, match=message):
            read_image_text_zip(path)
    small = _zip(tmp_path / "small.zip", {"a.png": _png(20, 20)}, [{"image": "a.png", "text": "x"}])
    with pytest.raises(ValueError, match="20x20 pixels"):
        read_image_text_zip(small, ArchiveLimits(max_image_pixels=100))


@pytest.mark.parametrize(("members", "records", "message"), [
    ({"a.png": b"not an image"}, [{"image": "a.png", "text": "x"}], "not a readable PNG or JPEG"),
    ({"a.png": _png(2, 2)}, [{"image": "b.png", "text": "x"}], "is not in the zip"),
    ({"a.png": _png(2, 2)}, [{"image": "a.png"}], "field \"text\""),
    ({"a.png": _png(2, 2)}, [], "no records"),
    ({"a.png": _png(2, 2)}, None, "no data.jsonl"),
])
def test_zip_reader_explains_bad_contents(tmp_path: Path, members: dict[str, bytes],
                                          records: list[dict[str, str]] | None, message: str) -> None:
    path = _zip(tmp_path / "bad.zip", members, records)
    with pytest.raises(ValueError, match=message):
        read_image_text_zip(path)


def test_not_a_zip_is_a_dataset_error(tmp_path: Path) -> None:
    path = tmp_path / "fake.zip"
    path.write_bytes(b"plain text")
    with pytest.raises(JobError, match="not a readable zip"):
        load_image_text(str(path))
