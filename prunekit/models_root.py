"""The server's models root: built-in demo and fixture models, and models imported from a file or folder."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

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
