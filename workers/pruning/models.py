"""Models in and out: resolve a model reference, load an HF or GGUF folder, find the blocks, save a folder.

Only formats that cannot run code on load are read: safetensors and GGUF, with trust_remote_code=False.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from workers.pruning.spec import JobError

HF_ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")


@dataclass
class LoadedModel:
    model: Any  # a transformers PreTrainedModel for causal LM
    tokenizer: Any  # a transformers tokenizer
    source: str  # "hf" | "gguf"
    path: Path  # the folder (hf) or the .gguf file it came from


# --- references ----------------------------------------------------------------------------------------


def resolve_model_ref(ref: str, models_root: Path, hf_cache_dir: Path) -> Path:
    """`local:<name>` -> a folder under models_root; `hf:<org>/<name>[@revision]` -> a hub snapshot folder."""
    scheme, _, rest = ref.partition(":")
    if scheme == "local" and rest:
        return _resolve_local(rest, models_root)
    if scheme == "hf" and rest:
        return _resolve_hf(rest, hf_cache_dir)
    raise JobError("invalid_model", f"Model reference {ref!r} is not understood: use local:<name> or "
                                    "hf:<org>/<name>[@revision].")


def _resolve_local(name: str, models_root: Path) -> Path:
    root = models_root.resolve()
    candidate = Path(name)
    if candidate.is_absolute() or ".." in candidate.parts or name in (".", ""):
        raise JobError("invalid_model", f"Model name {name!r} must be a folder name inside the models root.")
    folder = root / candidate
    if not _resolves_inside(folder, root):
        raise JobError("invalid_model", f"Model {name!r} points outside the models root.")
    if not folder.is_dir():
        raise JobError("model_load_failed", f"There is no model named {name!r} in the models root.")
    # A file symlinked to e.g. /etc/... would be read on load: every entry must stay inside the root too.
    for entry in folder.rglob("*"):
        if not _resolves_inside(entry, root):
            raise JobError("invalid_model",
                           f"Model {name!r} holds {entry.name!r}, a link to outside the models root.")
    return folder.resolve()


def _resolves_inside(path: Path, root: Path) -> bool:
    try:
        real = path.resolve()
    except (OSError, RuntimeError):  # a symlink loop
        return False
    return real != root and root in real.parents


def _resolve_hf(rest: str, hf_cache_dir: Path) -> Path:
    repo_id, _, revision = rest.partition("@")
    if not _REPO_ID.match(repo_id) or ".." in repo_id:
        raise JobError("invalid_model", f"{repo_id!r} is not a hub repository id of the form <org>/<name>.")
    if revision and (not _REVISION.match(revision) or ".." in revision):
        raise JobError("invalid_model", f"{revision!r} is not a valid revision (a branch, tag or commit).")
    from huggingface_hub import snapshot_download  # only hf: references need it

    try:
        folder = snapshot_download(repo_id, revision=revision or None, cache_dir=str(hf_cache_dir),
                                   allow_patterns=HF_ALLOW_PATTERNS)
    except Exception as exc:  # network, auth, unknown repo or revision, offline cache miss: "cannot get it"
        raise JobError("model_load_failed",
                       f"Could not get hf:{rest} from the hub or its local cache ({type(exc).__name__}: "
                       f"{_first_line(exc)}).") from exc
    return Path(folder)


# --- loading -------------------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise JobError("device_unavailable", "This worker has no CUDA device; use device 'cpu' or 'auto'.")
    if name not in ("cpu", "cuda"):
        raise JobError("device_unavailable", f"Unknown device {name!r}: use 'cpu', 'cuda' or 'auto'.")
    return torch.device(name)


def load_model(model_dir: Path, device: torch.device | str = "cpu") -> LoadedModel:
    """An HF folder (config.json + *.safetensors) or a folder with exactly one .gguf, plus its tokenizer."""
    device = torch.device(device)
    folder = Path(model_dir)
    if not folder.is_dir():
        raise JobError("model_load_failed", f"The model folder {folder} does not exist.")
    files = sorted(p for p in folder.iterdir() if p.is_file())
    safetensors = [p for p in files if p.suffix == ".safetensors"]
    ggufs = [p for p in files if p.suffix == ".gguf"]
    config = folder / "config.json"
    if config.is_file() and safetensors:
        return _load_hf(folder, config, safetensors, device)
    if len(ggufs) == 1:
        return load_gguf(ggufs[0], device)
    if len(ggufs) > 1:
        names = ", ".join(p.name for p in ggufs)
        raise JobError("model_load_failed",
                       f"The model folder holds several GGUF files ({names}); expected one.")
    pickles = [p.name for p in files if p.suffix in PICKLE_SUFFIXES]
    if pickles and not safetensors:
        raise JobError("model_load_failed",
                       f"The model folder only has pickled weights ({', '.join(pickles)}), which can run "
                       "code when loaded; provide *.safetensors weights (or a .gguf file) instead.")
    if not config.is_file():
        raise JobError("model_load_failed", "The model folder has no config.json (and no single .gguf file).")
    raise JobError("model_load_failed", "The model folder has a config.json but no *.safetensors weights.")


def _load_hf(folder: Path, config: Path, weights: list[Path], device: torch.device) -> LoadedModel:
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    try:
        parsed = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise JobError("model_load_failed", f"config.json is not valid JSON ({_first_line(exc)}).") from exc
    if not isinstance(parsed, dict) or "model_type" not in parsed:
        raise JobError("model_load_failed", "config.json is not a transformers model config (no model_type).")
    for path in weights:  # reads only the header: catches truncated or corrupt files before a long load
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except Exception as exc:
            raise JobError("model_load_failed", f"{path.name} is not a readable safetensors file "
                                                f"({_first_line(exc)}).") from exc
    # On CPU everything runs in fp32; on GPU a bf16 checkpoint stays bf16 (statistics are fp32 regardless).
    dtype: Any = torch.float32 if device.type == "cpu" else "auto"
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=False,
                                                     use_safetensors=True)
    except Exception as exc:  # transformers raises many types for one meaning: this folder cannot be loaded
        raise JobError("model_load_failed", f"Could not load the model in {folder.name} "
                                            f"({type(exc).__name__}: {_first_line(exc)}).") from exc
    tokenizer = _load_tokenizer(folder)
    return LoadedModel(_place(model, device), tokenizer, "hf", folder)


def load_gguf(gguf_path: Path, device: torch.device | str = "cpu") -> LoadedModel:
    """GGUF weights are dequantised by transformers into fp32 tensors of the matching architecture."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                     dtype=torch.float32, trust_remote_code=False)
    except Exception as exc:
        raise JobError("model_load_failed", f"Could not load the GGUF file {gguf_path.name} "
                                            f"({type(exc).__name__}: {_first_line(exc)}).") from exc
    tokenizer = _load_tokenizer(gguf_path.parent, gguf_file=gguf_path.name)
    return LoadedModel(_place(model, torch.device(device)), tokenizer, "gguf", gguf_path)


def _load_tokenizer(folder: Path, **kwargs: Any) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False, **kwargs)
    except Exception as exc:
        raise JobError("model_load_failed", f"Could not load the tokenizer in {folder.name} "
                                            f"({type(exc).__name__}: {_first_line(exc)}).") from exc


def _place(model: nn.Module, device: torch.device) -> nn.Module:
    if device.type != "cpu" and next(model.parameters()).dtype not in (torch.bfloat16, torch.float32):
        model = model.float()  # fp16 overflows in long sums; bf16 has fp32's range
    return model.to(device).eval()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


# --- structure -----------------------------------------------------------------------------------------


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The repeated decoder blocks: the nn.ModuleList of same-typed modules holding the most parameters.

    Parameters rather than length decide, so that a list of MoE experts inside a block never wins.
    """
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[0]:
            best = (size, name, module)
    if best is None:
        raise JobError("invalid_model", "The model has no repeated blocks (nn.ModuleList) to prune.")
    return best[1], best[2]


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear of one block, by name relative to the block."""
    return {name: module for name, module in block.named_modules() if isinstance(module, nn.Linear)}


def prunable_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """Every Linear inside the blocks, by full name; embeddings and the LM head are outside the blocks."""
    prefix, blocks = find_blocks(model)
    return {f"{prefix}.{index}.{name}": layer
            for index, block in enumerate(blocks) for name, layer in block_linears(block).items()}


# --- saving --------------------------------------------------------------------------------------------


def save_pretrained_folder(model: Any, tokenizer: Any, dest: Path) -> None:
    """config.json, model.safetensors, generation_config.json and tokenizer files, loadable without GGUF."""
    # A GGUF-loaded model still carries the quantizer that dequantised it; its weights are plain tensors now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
