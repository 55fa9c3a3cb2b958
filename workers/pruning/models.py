"""Models in and out: resolve a model reference, load an HF or GGUF folder, find its towers of blocks, save.

Only formats that cannot run code on load are read: safetensors and GGUF, with trust_remote_code=False.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.vocabulary import OFFLOAD_CPU, offload_mode
from workers.pruning.files import open_to_readers
from workers.pruning.spec import JobError

HF_ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
# Image/processor settings: plain JSON, read by AutoImageProcessor / AutoProcessor; carried into the output.
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "chat_template.json", "chat_template.jinja")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")


# Model types loaded with a class of their own; every other model_type is a causal LM (AutoModelForCausalLM).
MULTIMODAL_CLASSES = {
    "clip": "CLIPModel",
    "llava": "LlavaForConditionalGeneration",
    "blip-2": "Blip2ForConditionalGeneration",
}
# Files that make a tokenizer; a vision-language folder may have none of them.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass
class LoadedModel:
    model: Any  # a transformers PreTrainedModel: a causal LM, or one of MULTIMODAL_CLASSES
    tokenizer: Any  # a transformers tokenizer; None for a vision-language folder that ships none
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


def load_model(model_dir: Path, device: torch.device | str = "cpu", offload: bool | str = False) -> LoadedModel:
    """An HF folder (config.json + *.safetensors) or a folder with exactly one .gguf, plus its tokenizer.

    With offload (true or "cpu"), the dtype is chosen for `device` but the model stays on the CPU: the sequential
    driver moves one block at a time to the device. (Streaming from disk is streaming.StreamedModel's.)
    """
    device = torch.device(device)
    home = torch.device("cpu") if offload_mode(offload) == OFFLOAD_CPU else device
    folder = Path(model_dir)
    if not folder.is_dir():
        raise JobError("model_load_failed", f"The model folder {folder} does not exist.")
    files = sorted(p for p in folder.iterdir() if p.is_file())
    safetensors = [p for p in files if p.suffix == ".safetensors"]
    ggufs = [p for p in files if p.suffix == ".gguf"]
    config = folder / "config.json"
    if config.is_file() and safetensors:
        return _load_hf(folder, config, safetensors, device, home)
    if len(ggufs) == 1:
        return load_gguf(ggufs[0], home)
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


def _model_type(config: Path) -> str:
    try:
        parsed = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise JobError("model_load_failed", f"config.json is not valid JSON ({_first_line(exc)}).") from exc
    if not isinstance(parsed, dict) or "model_type" not in parsed:
        raise JobError("model_load_failed", "config.json is not a transformers model config (no model_type).")
    return str(parsed["model_type"])


def _from_pretrained(folder: Path, model_type: str, dtype: Any) -> Any:
    try:
        return model_class(model_type).from_pretrained(folder, dtype=dtype, trust_remote_code=False,
                                                       use_safetensors=True)
    except Exception as exc:  # transformers raises many types for one meaning: this folder cannot be loaded
        raise JobError("model_load_failed", f"Could not load the model in {folder.name} "
                                            f"({type(exc).__name__}: {_first_line(exc)}).") from exc


def _load_hf(folder: Path, config: Path, weights: list[Path], device: torch.device,
             home: torch.device) -> LoadedModel:
    """`device` decides the dtype, `home` where the weights live (the CPU when offloading)."""
    from safetensors import safe_open

    model_type = _model_type(config)
    for path in weights:  # reads only the header: catches truncated or corrupt files before a long load
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except Exception as exc:
            raise JobError("model_load_failed", f"{path.name} is not a readable safetensors file "
                                                f"({_first_line(exc)}).") from exc
    # On CPU everything runs in fp32; on GPU a bf16 checkpoint stays bf16 (statistics are fp32 regardless).
    dtype: Any = torch.float32 if device.type == "cpu" else "auto"
    model = _from_pretrained(folder, model_type, dtype)
    return LoadedModel(_place(model, device, home), folder_tokenizer(folder, model_type), "hf", folder)


def folder_tokenizer(folder: Path, model_type: str) -> Any:
    """The folder's tokenizer; None for a vision-language folder that ships none (only its text towers need one)."""
    optional = model_type in MULTIMODAL_CLASSES and not any((folder / name).is_file() for name in _TOKENIZER_FILES)
    return None if optional else _load_tokenizer(folder)


def model_type_of(folder: Path) -> str:
    """config.json's model_type (JobError model_load_failed when it has none or is not JSON)."""
    return _model_type(folder / "config.json")


def model_class(model_type: str) -> Any:
    """The transformers class a folder of this model_type loads as."""
    import transformers

    return getattr(transformers, MULTIMODAL_CLASSES.get(model_type, "AutoModelForCausalLM"))


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


def _place(model: nn.Module, device: torch.device, home: torch.device | None = None) -> nn.Module:
    if device.type != "cpu" and next(model.parameters()).dtype not in (torch.bfloat16, torch.float32):
        model = model.float()  # fp16 overflows in long sums; bf16 has fp32's range
    return model.to(home or device).eval()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


# --- structure -----------------------------------------------------------------------------------------

# Towers, in the order a forward pass runs them (so a later tower is calibrated on an earlier, pruned one).
TOWERS = ("vision", "qformer", "language")
# Towers pruned when a job gives no `targets`: the Q-Former is small and couples the two modalities.
DEFAULT_TOWERS = ("vision", "language")
# Which tower a list of blocks belongs to, from the first of these names on its module path. Every other
# list is "language". CLIP's text encoder counts as "language": it is the tower that reads text, and one name
# per concept lets a job say {"language": 0.5} of CLIP, LLaVA and BLIP-2 alike.
_TOWER_OF_MODULE = {
    "vision_model": "vision",  # CLIP, BLIP-2
    "vision_tower": "vision",  # LLaVA
    "qformer": "qformer",  # BLIP-2
    "text_model": "language",  # CLIP
}


@dataclass(frozen=True)
class Tower:
    """One stack of identical blocks: the unit that is calibrated and pruned front to back."""

    name: str  # one of TOWERS
    prefix: str  # module path of the nn.ModuleList, e.g. "model.vision_tower.encoder.layers"
    blocks: nn.ModuleList


class LinearView:
    """A prunable layer as methods see it: `weight` is [out_features, in_features], sharing the storage.

    transformers' Conv1D (GPT-2) stores its weight as [in, out]; this view lets every method treat it like an
    nn.Linear, and writing into `weight` writes the module's own weight.
    """

    def __init__(self, layer: nn.Module) -> None:
        self.weight = weight_matrix(layer)
        self.out_features, self.in_features = self.weight.shape


def _conv1d_type() -> type[nn.Module]:
    from transformers.pytorch_utils import Conv1D

    return Conv1D


def is_prunable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear | _conv1d_type())


def weight_matrix(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as [out, in], a view of its storage (no copy), outside autograd."""
    weight = layer.weight.data
    return weight.t() if isinstance(layer, _conv1d_type()) else weight


def method_view(layer: nn.Module) -> Any:
    """What a method's statistics constructor receives: the Linear itself, or a LinearView of a Conv1D."""
    return layer if isinstance(layer, nn.Linear) else LinearView(layer)


def find_towers(model: nn.Module) -> list[Tower]:
    """Every tower of the model, in TOWERS order: per tower, the largest nn.ModuleList of same-typed blocks.

    Blocks are found by discovery, not per model class; parameters rather than length decide between lists,
    so that a list of MoE experts inside a block never wins over the blocks themselves.
    """
    best: dict[str, tuple[int, str, nn.ModuleList]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        if not any(is_prunable(m) for m in module[0].modules()):
            continue
        tower = tower_of(name)
        size = sum(p.numel() for p in module.parameters())
        if tower not in best or size > best[tower][0]:
            best[tower] = (size, name, module)
    if not best:
        raise JobError("invalid_model", "The model has no repeated blocks (nn.ModuleList) to prune.")
    return [Tower(tower, best[tower][1], best[tower][2]) for tower in TOWERS if tower in best]


def plan_towers(towers: Sequence[Tower], sparsity: float,
                targets: Mapping[str, float] | None = None) -> list[tuple[Tower, float]]:
    """(tower, sparsity) for every tower to prune, in forward order; towers not in the plan stay dense."""
    if targets is None:
        return [(tower, sparsity) for tower in towers if tower.name in DEFAULT_TOWERS]
    present = {tower.name for tower in towers}
    missing = sorted(set(targets) - present)
    if missing:
        raise JobError("invalid_spec", f"targets names {', '.join(map(repr, missing))}, which this model does not "
                                       f"have; its towers: {', '.join(sorted(present))}.")
    for name, value in targets.items():
        if not 0.0 < value < 1.0:
            raise JobError("invalid_spec", f"targets[{name!r}] must be between 0 and 1 (exclusive); got {value}.")
    return [(tower, float(targets[tower.name])) for tower in towers if tower.name in targets]


def tower_of(module_path: str) -> str:
    for part in module_path.split("."):
        if part in _TOWER_OF_MODULE:
            return _TOWER_OF_MODULE[part]
    return "language"


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The language tower's blocks (a decoder LM's decoder layers), or the largest tower's if none."""
    towers = find_towers(model)
    language = [t for t in towers if t.name == "language"]
    tower = language[0] if language else max(towers, key=lambda t: sum(p.numel() for p in t.blocks.parameters()))
    return tower.prefix, tower.blocks


def block_linears(block: nn.Module) -> dict[str, nn.Module]:
    """Every prunable layer (nn.Linear, transformers' Conv1D) of one block, by name relative to the block."""
    return {name: module for name, module in block.named_modules() if is_prunable(module)}


def tower_layers(tower: Tower) -> dict[str, nn.Module]:
    """Every prunable layer inside one tower's blocks, by full module name."""
    return {f"{tower.prefix}.{index}.{name}": layer
            for index, block in enumerate(tower.blocks) for name, layer in block_linears(block).items()}


def prunable_layers(model: nn.Module, towers: Sequence[str] | None = None) -> dict[str, nn.Module]:
    """Every prunable layer inside the blocks of the named towers (all towers when None), by full name.

    Embeddings, heads, projectors between towers and anything else outside the blocks stay dense.
    """
    return {name: layer for tower in find_towers(model) if towers is None or tower.name in towers
            for name, layer in tower_layers(tower).items()}


# --- saving --------------------------------------------------------------------------------------------


def save_pretrained_folder(model: Any, tokenizer: Any, dest: Path, source: Path | None = None) -> None:
    """config.json, model.safetensors, generation_config.json and tokenizer files, loadable without GGUF.

    tokenizer may be None (a vision-language folder without one); the image processor's files of a
    `source` folder are copied as they are, so the saved folder is used exactly like the original.
    """
    # A GGUF-loaded model still carries the quantizer that dequantised it; its weights are plain tensors now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    created = not dest.exists()
    dest.mkdir(parents=True, exist_ok=True)
    try:
        model.save_pretrained(dest, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(dest)
        if source is not None and source.is_dir():
            for name in PROCESSOR_FILES:
                if (source / name).is_file() and not (dest / name).exists():
                    shutil.copyfile(source / name, dest / name)
    except BaseException:
        if created:  # half a model (a full disk, most often) is no model: its files would only take the space
            shutil.rmtree(dest, ignore_errors=True)
        raise
    open_to_readers(dest)  # safetensors writes 0600; the folder is read by the API, perhaps as another user


# Files of an HF folder besides its weights that a copy of the model carries: config, generation config,
# tokenizer, processor and chat template files.
_FOLDER_FILES = ("*.json", "tokenizer*", "*.model", "*.txt", "*.jinja")


def checkpoint_names(model: nn.Module, tensor_names: Sequence[str]) -> dict[str, str]:
    """Tensor name in a folder's safetensors files -> the model's parameter or buffer it loads into.

    Renamed as from_pretrained renames them (LLaVA's files say `language_model.model.*`, its modules
    `model.language_model.*`); names the model holds no parameter for are left out. A checkpoint whose tensors
    transformers converts (splits, merges, permutes) rather than renames cannot be matched one to one: JobError.
    """
    state: dict[str, Any] = {**dict(model.named_parameters(remove_duplicate=False)),
                             **dict(model.named_buffers(remove_duplicate=False))}
    try:  # transformers' own renaming rules, from its loading internals (pyproject pins the release they are in)
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # another release: a file's names are the model's own (Llama, Mistral, ...) or unmatched
        return {tensor: tensor for tensor in tensor_names if tensor in state}
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    names: dict[str, str] = {}
    for tensor in tensor_names:
        target, converted = rename_source_key(tensor, renamings, converters, model.base_model_prefix, state)
        if converted is not None:
            raise JobError("invalid_model", f"The model's files store {tensor} in a layout transformers converts "
                                            "when loading (not one tensor per parameter), which cannot be written "
                                            "back tensor by tensor.")
        if target in state:
            names[tensor] = target
    return names


def copy_folder_files(source: Path, dest: Path) -> None:
    """The source folder's config, tokenizer and processor files (not its weights), as they are."""
    for path in sorted(source.iterdir()):
        if (path.is_file() and not path.name.startswith(".") and path.suffix not in (".safetensors", *PICKLE_SUFFIXES)
                and path.name != "model.safetensors.index.json" and any(path.match(p) for p in _FOLDER_FILES)):
            shutil.copyfile(path, dest / path.name)


def save_like_source(model: nn.Module, source: Path, dest: Path, shard_bytes: int) -> None:
    """The model's weights in the source folder's layout: the same tensor names, each in the dtype the source
    stores it in (bf16 in, bf16 out), in Hugging Face's sharded layout; the source's other files copied. Tensors
    the model holds no parameter for are copied from the source as they are.

    A model whose files transformers converts on load is saved by save_pretrained_folder instead."""
    from workers.pruning.weights_io import ShardedWriter, WeightFiles

    with WeightFiles(source) as files:
        try:
            names = checkpoint_names(model, files.names())
        except JobError:
            save_pretrained_folder(model, None, dest, source)
            copy_folder_files(source, dest)
            return
        state: dict[str, torch.Tensor] = {**dict(model.named_parameters(remove_duplicate=False)),
                                          **dict(model.named_buffers(remove_duplicate=False))}
        created = not dest.exists()
        try:
            writer = ShardedWriter(dest, [files.info(name) for name in files.names()], shard_bytes)
            for name in files.names():
                writer.write(name, state[names[name]].detach() if name in names else files.get(name))
            writer.close()
            copy_folder_files(source, dest)
        except BaseException:
            if created:  # half a model is no model (see save_pretrained_folder)
                shutil.rmtree(dest, ignore_errors=True)
            raise
    open_to_readers(dest)
