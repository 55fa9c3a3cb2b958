import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from workers.pruning import data
from workers.pruning.spec import JobError


class CharTokenizer:
    """One token per character: enough to test windowing and caching without a model."""

    name_or_path = "chars"

    def __len__(self) -> int:
        return 256

    def __call__(self, text: str, **_kwargs: object) -> dict[str, list[int]]:
        self.calls = getattr(self, "calls", 0) + 1
        return {"input_ids": [ord(c) % 256 for c in text]}


def test_evaluation_windows_are_the_first_tokens_in_order() -> None:
    tokens = torch.arange(100)
    windows = data.evaluation_windows(tokens, 3, 10)
    assert windows.shape == (3, 10)
    assert torch.equal(windows.flatten(), torch.arange(30))


def test_calibration_windows_follow_the_seeded_protocol() -> None:
    tokens = torch.arange(1000)
    windows = data.calibration_windows(tokens, 8, 50, seed=3)
    starts = torch.randint(500, 950, (8,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(windows[:, 0], starts)  # token value == its position here
    assert torch.equal(windows, torch.stack([torch.arange(s, s + 50) for s in starts.tolist()]))
    assert bool((windows[:, 0] >= 500).all()) and bool((windows[:, -1] < 1000).all())
    assert torch.equal(windows, data.calibration_windows(tokens, 8, 50, seed=3))
    assert not torch.equal(windows, data.calibration_windows(tokens, 8, 50, seed=4))


@pytest.mark.parametrize(("call", "needle"), [
    (lambda t: data.evaluation_windows(t, 10, 20), "only 100"),
    (lambda t: data.calibration_windows(t, 4, 60), "100"),
])
def test_too_few_tokens_is_a_dataset_error(call: Callable[[torch.Tensor], object], needle: str) -> None:
    with pytest.raises(JobError) as info:
        call(torch.arange(100))
    assert info.value.code == "dataset_error" and needle in info.value.message


def test_builtin_wiki_en_is_sorted_extracts_joined() -> None:
    entries = json.loads(data.wiki_en_path().read_text(encoding="utf-8"))
    first, second = sorted(entries)[:2]
    text = data.load_text("builtin:wiki-en")
    assert text.startswith(entries[first]["extract"] + "\n\n" + entries[second]["extract"])
    assert len(text) > 4_000_000


def test_local_txt_and_jsonl(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("hello world", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text('{"text": "one"}\n\n{"text": "two", "id": 2}\n', encoding="utf-8")
    assert data.load_text(str(tmp_path / "a.txt")) == "hello world"
    assert data.load_text(str(tmp_path / "b.jsonl")) == "one\n\ntwo"


@pytest.mark.parametrize(("name", "content", "needle"), [
    ("bad.jsonl", '{"text": "ok"}\nnot json\n', "line 2"),
    ("nofield.jsonl", '{"body": "x"}\n', "\"text\""),
    ("data.csv", "a,b\n", "neither"),
    ("binary.txt", b"\xff\xfe\xfa", "UTF-8"),
])
def test_bad_local_datasets(tmp_path: Path, name: str, content: str | bytes, needle: str) -> None:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(JobError) as info:
        data.load_text(str(path))
    assert info.value.code == "dataset_error" and needle in info.value.message


@pytest.mark.parametrize("dataset", ["builtin:nope", "/no/such/file.txt"])
def test_unknown_datasets(dataset: str) -> None:
    with pytest.raises(JobError, match="dataset_error"):
        data.load_text(dataset)


def test_token_stream_is_cached_until_the_file_changes(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_text("abc", encoding="utf-8")
    tokenizer = CharTokenizer()
    first = data.token_stream(str(path), tokenizer)
    assert data.token_stream(str(path), tokenizer) is first and tokenizer.calls == 1
    assert first.tolist() == [97, 98, 99] and first.dtype == torch.long
    path.write_text("abcd", encoding="utf-8")
    assert data.token_stream(str(path), tokenizer).tolist() == [97, 98, 99, 100]
