"""The API and the engine read an uploaded archive with the same limits, from the same settings.

They used to differ: the API accepted up to 100,000 members, 2 GiB and 200x compression (its settings), while the
engine read with its own defaults (20,000 members, 1 GiB, 100x), so a dataset of 25,000 images was stored with a
201 and then failed every job that used it.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from app.capabilities import capabilities
from prunekit.core.config import Settings
from prunekit.core.uploads import InvalidUpload, check_upload
from prunekit.vocabulary import ARCHIVE_LIMITS, ArchiveLimits
from workers.pruning.images import read_image_text_zip
from workers.pruning.spec import CalibrationSpec, RestoreSpec

# The engine's own member limit before its limits came from the settings.
OLD_ENGINE_MAX_MEMBERS = 20_000


def tiny_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (2, 2), (200, 10, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def many_images_zip(path: Path, images: int) -> Path:
    """`images` 2x2 PNGs with a caption each: images + 1 members (data.jsonl)."""
    png = tiny_png()
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("data.jsonl", "".join(json.dumps({"image": f"i/{n}.png", "text": f"picture {n % 7}"}) + "\n"
                                               for n in range(images)))
        for n in range(images):
            archive.writestr(f"i/{n}.png", png)
    return path


@pytest.fixture(scope="module")
def big_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Above the engine's old member limit, within the API's: stored by the API, then unreadable by the worker.
    return many_images_zip(tmp_path_factory.mktemp("archive") / "big.zip", OLD_ENGINE_MAX_MEMBERS + 10)


def test_the_api_and_the_engine_agree_on_an_archive_between_the_old_limits(big_archive: Path,
                                                                              tmp_path: Path) -> None:
    limits = Settings(PRUNEKIT_VAR_DIR=tmp_path).archive_limits()
    checked = check_upload(big_archive, "big.zip", limits)
    assert checked.kind == "image-text" and checked.num_records == OLD_ENGINE_MAX_MEMBERS + 10
    assert len(read_image_text_zip(big_archive, limits)) == checked.num_records


def test_tighter_settings_bind_both_sides_alike(big_archive: Path, tmp_path: Path) -> None:
    limits = Settings(PRUNEKIT_VAR_DIR=tmp_path, MAX_ZIP_MEMBERS="1000").archive_limits()
    assert limits.max_members == 1000
    with pytest.raises(InvalidUpload, match="at most 1000"):
        check_upload(big_archive, "big.zip", limits)
    with pytest.raises(ValueError, match="at most 1000"):
        read_image_text_zip(big_archive, limits)


def test_the_settings_default_to_the_vocabulary_and_reach_every_spec(tmp_path: Path) -> None:
    from workers.job_spec import build_spec

    settings = Settings(PRUNEKIT_VAR_DIR=tmp_path, MAX_ZIP_COMPRESSION_RATIO="50", MAX_ZIP_MEMBER_BYTES="1000")
    assert Settings(PRUNEKIT_VAR_DIR=tmp_path).archive_limits() == ARCHIVE_LIMITS
    request = {"model": "local:x", "method": "wanda", "sparsity": 0.5, "calibration": {"dataset": "builtin:digits"},
               "restore": {"method": "sparse-lora", "steps": 2}}
    spec = build_spec(request, tmp_path, settings)
    expected = ArchiveLimits(max_ratio=50, max_member_bytes=1000)
    assert spec.calibration.archive_limits == expected
    assert spec.restore is not None and spec.restore.archive_limits == expected
    limits = capabilities(settings)["limits"]
    assert (limits["zip_compression_ratio"], limits["zip_member_bytes"]) == (50, 1000)
    # A spec built without the worker (a test, a notebook) reads with the vocabulary's defaults.
    assert CalibrationSpec().archive_limits == RestoreSpec().archive_limits == ARCHIVE_LIMITS


def test_a_caption_too_long_is_refused_by_both(tmp_path: Path) -> None:
    # The engine always refused it; the API stored it, and every job using it failed.
    path = tmp_path / "a.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("data.jsonl", json.dumps({"image": "a.png", "text": "x" * 101}) + "\n")
        archive.writestr("a.png", tiny_png())
    limits = ArchiveLimits(max_text_chars=100)
    with pytest.raises(InvalidUpload, match="101 characters; at most 100"):
        check_upload(path, "a.zip", limits)
    with pytest.raises(ValueError, match="101 characters; at most 100"):
        read_image_text_zip(path, limits)
    assert check_upload(path, "a.zip", ArchiveLimits(max_text_chars=101)).num_records == 1


def test_a_duplicated_or_oversized_member_is_refused_by_both(tmp_path: Path) -> None:
    limits = ArchiveLimits(max_member_bytes=100)
    big = tmp_path / "big.zip"
    with zipfile.ZipFile(big, "w") as archive:
        archive.writestr("data.jsonl", json.dumps({"image": "a.png", "text": "x"}) + "\n")
        archive.writestr("a.png", tiny_png() + bytes(200))
    with pytest.raises(InvalidUpload, match="at most 100 for one entry"):
        check_upload(big, "big.zip", limits)
    with pytest.raises(ValueError, match="at most 100 are allowed"):
        read_image_text_zip(big, limits)
    twice = tmp_path / "twice.zip"
    with pytest.warns(UserWarning, match="Duplicate name"), zipfile.ZipFile(twice, "w") as archive:
        archive.writestr("data.jsonl", json.dumps({"image": "a.png", "text": "x"}) + "\n")
        archive.writestr("a.png", tiny_png())
        archive.writestr("a.png", tiny_png())
    with pytest.raises(InvalidUpload, match="appears twice"):
        check_upload(twice, "twice.zip", ARCHIVE_LIMITS)
    with pytest.raises(ValueError, match="appears twice"):
        read_image_text_zip(twice, ARCHIVE_LIMITS)


def test_pixel_counts_are_checked_from_the_headers_by_both(tmp_path: Path) -> None:
    path = tmp_path / "pictures.zip"
    jpeg = io.BytesIO()
    Image.new("L", (20, 10), 128).save(jpeg, format="JPEG")
    picture = io.BytesIO()
    Image.new("RGB", (20, 20), (1, 2, 3)).save(picture, format="PNG")
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("data.jsonl", "".join(json.dumps({"image": name, "text": "x"}) + "\n"
                                               for name in ("a.png", "b.jpg", "a.png")))
        archive.writestr("a.png", picture.getvalue())
        archive.writestr("b.jpg", jpeg.getvalue())
    # One image too large: 400 pixels.
    one = ArchiveLimits(max_image_pixels=300)
    with pytest.raises(InvalidUpload, match="'a.png' is 20x20 pixels; at most 300"):
        check_upload(path, "pictures.zip", one)
    with pytest.raises(ValueError, match="20x20 pixels"):
        read_image_text_zip(path, one)
    # All records' images together: 400 + 200 + 400 (an image named twice is decoded twice).
    for total, accepted in ((999, False), (1000, True)):
        limits = ArchiveLimits(max_total_pixels=total)
        if accepted:
            assert check_upload(path, "pictures.zip", limits).num_records == 3
            assert len(read_image_text_zip(path, limits)) == 3
            continue
        with pytest.raises(InvalidUpload, match="more than 999 pixels in all"):
            check_upload(path, "pictures.zip", limits)
        with pytest.raises(ValueError, match="more than 999 pixels in all"):
            read_image_text_zip(path, limits)


def test_a_file_named_png_that_is_not_an_image_is_refused_by_both(tmp_path: Path) -> None:
    path = tmp_path / "fake.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("data.jsonl", json.dumps({"image": "a.png", "text": "x"}) + "\n")
        archive.writestr("a.png", b"not an image at all")
    with pytest.raises(InvalidUpload, match="'a.png' is not a PNG or JPEG file"):
        check_upload(path, "fake.zip", ARCHIVE_LIMITS)
    with pytest.raises(ValueError, match="not a readable PNG or JPEG"):
        read_image_text_zip(path, ARCHIVE_LIMITS)
