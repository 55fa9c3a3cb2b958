import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.unit.conftest import tiny_llama_from_config
from workers.pruning.models import find_blocks, load_model, prunable_layers, resolve_model_ref
from workers.pruning.spec import JobError


def load_error(folder: Path) -> JobError:
    with pytest.raises(JobError) as info:
        load_model(folder)
    assert info.value.code == "model_load_failed"
    return info.value


def copy_model(source: Path, dest: Path) -> Path:
    shutil.copytree(source, dest)
    return dest


# --- loading -----------------------------------------------------------------------------------------


def test_loads_an_hf_folder_in_fp32(tiny_llama_dir: Path) -> None:
    loaded = load_model(tiny_llama_dir)
    assert loaded.source == "hf" and loaded.model.dtype == torch.float32 and not loaded.model.training
    assert loaded.tokenizer("hello")["input_ids"]


def test_refuses_pickle_only_weights(tmp_path: Path, tiny_llama_dir: Path) -> None:
    folder = copy_model(tiny_llama_dir, tmp_path / "m")
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    error = load_error(folder)
    assert "pytorch_model.bin" in error.message and "safetensors" in error.message


def test_refuses_malformed_config(tmp_path: Path, tiny_llama_dir: Path) -> None:
    folder = copy_model(tiny_llama_dir, tmp_path / "m")
    (folder / "config.json").write_text('{"model_type": "llama", ', encoding="utf-8")
    assert "config.json" in load_error(folder).message


def test_refuses_truncated_safetensors(tmp_path: Path, tiny_llama_dir: Path) -> None:
    folder = copy_model(tiny_llama_dir, tmp_path / "m")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert "model.safetensors" in load_error(folder).message


def test_refuses_config_from_unknown_architecture(tmp_path: Path, tiny_llama_dir: Path) -> None:
    folder = copy_model(tiny_llama_dir, tmp_path / "m")
    (folder / "config.json").write_text('{"model_type": "no-such-model"}', encoding="utf-8")
    assert "Could not load the model" in load_error(folder).message


def test_refuses_missing_empty_and_ambiguous_folders(tmp_path: Path) -> None:
    assert "does not exist" in load_error(tmp_path / "missing").message
    assert "no config.json" in load_error(tmp_path).message
    (tmp_path / "config.json").write_text("{}", encoding="utf-8")
    assert "no *.safetensors" in load_error(tmp_path).message
    (tmp_path / "a.gguf").write_bytes(b"GGUF")
    (tmp_path / "b.gguf").write_bytes(b"GGUF")
    assert "several GGUF" in load_error(tmp_path).message


def test_refuses_a_malformed_gguf(tmp_path: Path) -> None:
    (tmp_path / "model.gguf").write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    assert "model.gguf" in load_error(tmp_path).message


def test_finds_the_decoder_blocks_and_their_linears() -> None:
    model = tiny_llama_from_config()
    prefix, blocks = find_blocks(model)
    assert prefix == "model.layers" and blocks is model.model.layers
    names = list(prunable_layers(model))
    assert len(names) == 2 * 7 and names[0] == "model.layers.0.self_attn.q_proj"
    assert not any("embed" in n or "lm_head" in n for n in names)


# --- references ----------------------------------------------------------------------------------------


def test_local_ref_resolves_inside_the_root(tmp_path: Path, tiny_llama_dir: Path) -> None:
    root = tmp_path / "models"
    copy_model(tiny_llama_dir, root / "tiny")
    assert resolve_model_ref("local:tiny", root, tmp_path / "cache") == (root / "tiny").resolve()


@pytest.mark.parametrize("name", ["../models", "/etc", "tiny/../../x", ".", "outside-link", "file-link"])
def test_local_ref_rejects_escapes(tmp_path: Path, name: str) -> None:
    root = tmp_path / "models"
    (root / "inner").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "secret.json").write_text("{}", encoding="utf-8")
    (root / "outside-link").symlink_to(tmp_path / "elsewhere")
    (root / "file-link").mkdir()
    (root / "file-link" / "config.json").symlink_to(tmp_path / "secret.json")
    with pytest.raises(JobError) as info:
        resolve_model_ref(f"local:{name}", root, tmp_path / "cache")
    assert info.value.code == "invalid_model"


def test_local_ref_to_a_missing_model(tmp_path: Path) -> None:
    with pytest.raises(JobError) as info:
        resolve_model_ref("local:nope", tmp_path, tmp_path / "cache")
    assert info.value.code == "model_load_failed" and "nope" in info.value.message


@pytest.mark.parametrize("ref", ["s3x:bucket", "tiny", "local:", "hf:", "hf:no-slash", "hf:a/b@../x",
                                 "hf:../b"])
def test_malformed_refs(tmp_path: Path, ref: str) -> None:
    with pytest.raises(JobError) as info:
        resolve_model_ref(ref, tmp_path, tmp_path / "cache")
    assert info.value.code == "invalid_model"


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    # huggingface_hub reads HF_HUB_OFFLINE once at import, so the constant is patched as well as the variable.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_hf_ref_loads_from_a_prefilled_cache_offline(tmp_path: Path, tiny_llama_dir: Path,
                                                      offline: None) -> None:
    cache = tmp_path / "hf-cache"
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--acme--tiny-llama"
    copy_model(tiny_llama_dir, repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha, encoding="utf-8")
    for ref in ("hf:acme/tiny-llama", f"hf:acme/tiny-llama@{sha}", "hf:acme/tiny-llama@main"):
        folder = resolve_model_ref(ref, tmp_path / "models", cache)
        assert folder == repo / "snapshots" / sha
    loaded = load_model(folder)
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert torch.equal(loaded.model.lm_head.weight, reference.lm_head.weight)


def test_hf_ref_missing_from_the_cache_offline(tmp_path: Path, offline: None) -> None:
    with pytest.raises(JobError) as info:
        resolve_model_ref("hf:acme/absent", tmp_path, tmp_path / "hf-cache")
    assert info.value.code == "model_load_failed" and "acme/absent" in info.value.message
