"""Checks a tenant's model before it is stored (POST /v1/models), and describes any HF model folder (GET /v1/models).

Pure standard library, as the API imports it and never imports torch or transformers. What can be known without
them is checked here, before a byte is stored, so a refusal names the file and the field at once:

- the archive (.zip, .tar, .tar.gz): entries that point outside it, links, devices, encrypted entries, too many
  entries, too many bytes, zip bombs (the dataset uploads' checks, prunekit.core.uploads, with the model limits);
- the files: safetensors weights, JSON configs and tokenizer files only; pickled checkpoints and code are refused
  by name, any other file too;
- every JSON file: `auto_map` or `trust_remote_code` anywhere in it (code the model would bring) is refused;
- config.json: a family this service prunes, its sizes stated as positive integers;
- the weights: each safetensors header (8 bytes of length, then JSON) is parsed as the safetensors library does
  (dtypes, shapes, offsets that tile the file exactly), and the shapes are compared with the config: the number of
  layers of each tower, and the shape of every attention, MLP and embedding weight the config determines.

The worker still loads the model with transformers (trust_remote_code off, mismatched sizes refused): what slips
past these rules fails there, and the model is then marked `failed` with the loader's message.
"""

from __future__ import annotations

import json
import math
import re
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from prunekit.core.uploads import InvalidUpload, _check_member
from prunekit.vocabulary import ArchiveLimits

__all__ = ["InvalidUpload", "ModelFiles", "FolderFiles", "ModelSummary", "check_model", "describe_folder",
           "extract_model_archive", "is_model_archive", "MODEL_ARCHIVE_SUFFIXES"]

MODEL_ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
# Files an HF model folder holds that can run no code when loaded.
KEPT_SUFFIXES = (".json", ".safetensors", ".model", ".txt", ".tiktoken", ".jinja")
# Pickled checkpoints (torch.load, joblib, numpy with pickles) run code when loaded: never accepted.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".joblib", ".npy", ".npz", ".h5", ".msgpack")
CODE_SUFFIXES = (".py", ".pyc", ".pyo", ".pyd", ".so", ".dylib", ".dll", ".exe", ".sh", ".bash", ".js", ".ipynb",
                 ".bat", ".cmd", ".ps1", ".rb", ".pl", ".jar", ".wasm")
# Found in model folders and archives, harmless, not needed: left out of what is stored.
SKIPPED_NAMES = ("README.md", "LICENSE", "LICENSE.txt", "LICENSE.md", "NOTICE", ".gitattributes", ".DS_Store")
SKIPPED_FOLDERS = ("__MACOSX",)
# The safetensors library refuses a longer header; so does this check, before reading it.
MAX_SAFETENSORS_HEADER = 100_000_000
# JSON files are read whole (tokenizer.json is the largest, tens of MB for big vocabularies).
MAX_JSON_BYTES = 64 * 2**20
REMOTE_CODE_KEYS = ("auto_map", "trust_remote_code")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")

# safetensors dtype -> (bytes per element, the name torch gives it).
DTYPES: dict[str, tuple[float, str]] = {
    "F64": (8, "float64"), "F32": (4, "float32"), "F16": (2, "float16"), "BF16": (2, "bfloat16"),
    "I64": (8, "int64"), "I32": (4, "int32"), "I16": (2, "int16"), "I8": (1, "int8"), "U64": (8, "uint64"),
    "U32": (4, "uint32"), "U16": (2, "uint16"), "U8": (1, "uint8"), "BOOL": (1, "bool"),
    "F8_E4M3": (1, "float8_e4m3fn"), "F8_E5M2": (1, "float8_e5m2"), "F8_E8M0": (1, "float8_e8m0fnu"),
    "F4": (0.5, "float4_e2m1fn_x2"),
}
# The towers each family has, as a job's `targets` names them.
FAMILY_TOWERS: dict[str, tuple[str, ...]] = {
    "llama": ("language",), "mistral": ("language",), "qwen2": ("language",), "gpt2": ("language",),
    "opt": ("language",), "clip": ("vision", "language"), "llava": ("vision", "language"),
    "blip-2": ("vision", "qformer", "language"),
}
# Sub-configs of the vision-language families, by tower; the causal LMs are one config.
_SUB_CONFIGS = {"clip": {"vision": "vision_config", "language": "text_config"},
                "llava": {"vision": "vision_config", "language": "text_config"},
                "blip-2": {"vision": "vision_config", "qformer": "qformer_config", "language": "text_config"}}
# Sizes stated in a config must be positive integers (transformers refuses anything else, or builds nonsense).
_SIZE_KEYS = ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size",
              "num_key_value_heads", "head_dim", "n_embd", "n_head", "n_layer", "n_positions", "n_inner", "ffn_dim",
              "max_position_embeddings", "image_size", "patch_size", "num_channels", "word_embed_proj_dim",
              "projection_dim", "encoder_hidden_size")
# What a causal LM's config must state itself: transformers would otherwise fill in a 7B model's sizes.
_REQUIRED_KEYS = {"llama": ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size",
                            "vocab_size"),
                  "gpt2": ("n_embd", "n_head", "n_layer", "vocab_size"),
                  "opt": ("hidden_size", "num_attention_heads", "num_hidden_layers", "ffn_dim", "vocab_size")}
_REQUIRED_KEYS["mistral"] = _REQUIRED_KEYS["qwen2"] = _REQUIRED_KEYS["llama"]


class ModelFiles(Protocol):
    """A model folder's files, wherever they are: a folder here, or an `s3://` prefix (read by ranges)."""

    def sizes(self) -> dict[str, int]: ...  # name (relative, POSIX) -> bytes
    def read(self, name: str, start: int = 0, length: int | None = None) -> bytes: ...


@dataclass
class FolderFiles:
    folder: Path

    def sizes(self) -> dict[str, int]:
        return {p.relative_to(self.folder).as_posix(): p.stat().st_size
                for p in sorted(self.folder.rglob("*")) if p.is_file() and not p.is_symlink()}

    def read(self, name: str, start: int = 0, length: int | None = None) -> bytes:
        with (self.folder / name).open("rb") as fh:
            fh.seek(start)
            return fh.read() if length is None else fh.read(length)


@dataclass
class ModelSummary:
    """What GET /v1/models shows of a model."""

    family: str | None
    model_type: str | None
    parameters: int | None
    towers: list[str]
    dtype: str | None
    size_bytes: int
    files: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Tensor:
    dtype: str
    shape: tuple[int, ...]
    file: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


# --- archives --------------------------------------------------------------------------------------------------


def is_model_archive(filename: str) -> bool:
    return filename.lower().endswith(MODEL_ARCHIVE_SUFFIXES)


def extract_model_archive(path: Path, filename: str, dest: Path, limits: ArchiveLimits) -> list[str]:
    """Checks the archive's entries and extracts the model's files, flat, into dest; returns their names.
    A folder at the archive's top holding everything (`my-model/config.json`) is taken as the model folder."""
    with ExitStack() as stack:
        return _extract(path, filename, dest, limits, stack)


def _extract(path: Path, filename: str, dest: Path, limits: ArchiveLimits, stack: ExitStack) -> list[str]:
    lower = filename.lower()
    if lower.endswith(".zip"):
        entries = _zip_entries(path, limits, stack)
    elif lower.endswith((".tar", ".tar.gz", ".tgz")):
        entries = _tar_entries(path, limits, stack)
    else:
        raise InvalidUpload(f"{filename!r} is not a .zip, .tar or .tar.gz archive of an HF model folder.")
    files = {name: opener for name, opener in entries if not _skipped(name)}
    root = _common_folder(list(files))
    kept: list[str] = []
    for name, opener in files.items():
        local = name[len(root):] if root else name
        check_file_name(local)
        if not local.lower().endswith(KEPT_SUFFIXES):
            continue  # check_file_name refused everything else
        with opener() as source, (dest / local).open("wb") as out:
            while chunk := source.read(1 << 20):
                out.write(chunk)
        kept.append(local)
    return sorted(kept)


def _zip_entries(path: Path, limits: ArchiveLimits, stack: ExitStack) -> list[tuple[str, Callable[[], Any]]]:
    try:
        archive = stack.enter_context(zipfile.ZipFile(path))
    except (zipfile.BadZipFile, OSError) as exc:
        raise InvalidUpload(f"the archive cannot be read as a zip file ({exc}).") from None
    members = archive.infolist()
    if len(members) > limits.max_members:
        raise InvalidUpload(f"the archive has {len(members)} entries; at most {limits.max_members}.")
    total = sum(m.file_size for m in members)
    if total > limits.max_total_bytes:
        raise InvalidUpload(f"the archive expands to {total} bytes; at most {limits.max_total_bytes}.")
    entries, seen = [], set()
    for member in members:
        name = _check_member(member, limits)  # outside the archive, links, encryption, member size, zip bombs
        if member.is_dir():
            continue
        if name in seen:
            raise InvalidUpload(f"the archive entry {name!r} appears twice.")
        seen.add(name)
        entries.append((name, lambda m=member: archive.open(m)))
    return entries


def _tar_entries(path: Path, limits: ArchiveLimits, stack: ExitStack) -> list[tuple[str, Callable[[], Any]]]:
    try:
        archive = stack.enter_context(tarfile.open(path, "r:*"))  # noqa: SIM115 (the caller's stack closes it)
        members = []
        for member in archive:  # read one header at a time: a tar's entry count is only known by reading it
            members.append(member)
            if len(members) > limits.max_members:
                raise InvalidUpload(f"the archive has more than {limits.max_members} entries.")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise InvalidUpload(f"the archive cannot be read as a tar file ({exc}).") from None
    total = 0
    entries, seen = [], set()
    for member in members:
        name = member.name
        parts = PurePosixPath(name).parts
        if name.startswith(("/", "\\")) or ".." in parts or "\\" in name or (parts and ":" in parts[0]):
            raise InvalidUpload(f"the archive entry {name!r} points outside the archive.")
        if member.issym() or member.islnk():
            raise InvalidUpload(f"the archive entry {name!r} is a link; links are not accepted.")
        if member.isdir():
            continue
        if not member.isfile():
            raise InvalidUpload(f"the archive entry {name!r} is not a regular file (a device or a pipe).")
        if member.size > limits.max_member_bytes:
            raise InvalidUpload(f"the archive entry {name!r} is {member.size} bytes; at most "
                                f"{limits.max_member_bytes} for one entry.")
        total += member.size
        if total > limits.max_total_bytes:
            raise InvalidUpload(f"the archive expands to more than {limits.max_total_bytes} bytes.")
        name = name.removeprefix("./")
        if name in seen:
            raise InvalidUpload(f"the archive entry {name!r} appears twice.")
        seen.add(name)
        entries.append((name, lambda m=member: _tar_stream(archive, m)))
    return entries


def _tar_stream(archive: tarfile.TarFile, member: tarfile.TarInfo) -> Any:
    stream = archive.extractfile(member)
    assert stream is not None  # a regular file, checked above
    return stream


def _skipped(name: str) -> bool:
    parts = PurePosixPath(name).parts
    return (not parts or parts[0] in SKIPPED_FOLDERS or parts[-1] in SKIPPED_NAMES
            or parts[-1].startswith("._"))  # macOS resource forks


def _common_folder(names: list[str]) -> str:
    """'folder/' when every file lies directly inside one top-level folder, else ''."""
    tops = {n.split("/", 1)[0] for n in names}
    if len(tops) == 1 and all("/" in n for n in names):
        return tops.pop() + "/"
    return ""


def check_file_name(name: str) -> None:
    """A file of an HF model folder that can run no code when loaded, at the folder's top level."""
    lower = name.lower()
    if "/" in name:
        raise InvalidUpload(f"{name!r} lies in a subfolder; the archive holds one HF model folder (its files at the "
                            "top level or inside one folder).")
    if lower.endswith(PICKLE_SUFFIXES):
        raise InvalidUpload(f"{name!r} is a pickled checkpoint, which can run code when loaded; only safetensors "
                            "weights are accepted (convert it with safetensors' convert script or "
                            "save_pretrained(safe_serialization=True)).")
    if lower.endswith(CODE_SUFFIXES):
        raise InvalidUpload(f"{name!r} is code; a model folder brings none (trust_remote_code is never on).")
    if not lower.endswith(KEPT_SUFFIXES):
        raise InvalidUpload(f"{name!r} is not a file of an HF model folder; accepted: "
                            f"{', '.join('*' + s for s in KEPT_SUFFIXES)}.")


# --- the folder ------------------------------------------------------------------------------------------------


def check_model(files: ModelFiles) -> ModelSummary:
    """Every check of the module's docstring; InvalidUpload names the file and the problem."""
    sizes = files.sizes()
    for name in sizes:
        if not _skipped(name):
            check_file_name(name)
    names = [n for n in sizes if not _skipped(n)]
    if "config.json" not in sizes:
        raise InvalidUpload("the model has no config.json.")
    weights = sorted(n for n in names if n.endswith(".safetensors"))
    if not weights:
        raise InvalidUpload("the model has no .safetensors weights.")
    jsons = {n: _read_json(files, n, sizes[n]) for n in names if n.endswith(".json")}
    for name, document in jsons.items():
        _refuse_remote_code(name, document)
    config = jsons["config.json"]
    family = _check_config(config)
    if FAMILY_TOWERS[family] == ("language",) and not any(n in sizes for n in TOKENIZER_FILES):
        raise InvalidUpload(f"the model has no tokenizer ({', '.join(TOKENIZER_FILES)}); a language model needs one "
                            "to read calibration text.")
    tensors = _read_tensors(files, weights, sizes)
    _check_index(jsons.get("model.safetensors.index.json"), tensors, weights)
    _check_shapes(family, config, tensors)
    return _summary(family, config, tensors, {n: sizes[n] for n in names})


def describe_folder(folder: Path) -> ModelSummary:
    """A server model's description (the operator's folder, trusted): the same reading without the refusals that
    concern uploads. Raises InvalidUpload when the folder is not a model that can be described (a GGUF folder, a
    broken config)."""
    files = FolderFiles(folder)
    sizes = files.sizes()
    config = _read_json(files, "config.json", sizes.get("config.json", 0)) if "config.json" in sizes else None
    if config is None:
        ggufs = [n for n in sizes if n.endswith(".gguf")]
        if ggufs:
            return ModelSummary(None, "gguf", None, ["language"], None, sum(sizes.values()), sorted(sizes))
        raise InvalidUpload("the folder has no config.json.")
    model_type = config.get("model_type") if isinstance(config, dict) else None
    family = model_type if model_type in FAMILY_TOWERS else None
    weights = sorted(n for n in sizes if n.endswith(".safetensors"))
    tensors = _read_tensors(files, weights, sizes)
    return _summary(family, config, tensors, sizes, model_type=model_type if isinstance(model_type, str) else None)


def _summary(family: str | None, config: dict[str, Any], tensors: dict[str, _Tensor], sizes: dict[str, int],
             model_type: str | None = None) -> ModelSummary:
    by_dtype: dict[str, int] = {}
    for tensor in tensors.values():
        by_dtype[tensor.dtype] = by_dtype.get(tensor.dtype, 0) + tensor.numel
    dtype = DTYPES[max(by_dtype, key=lambda d: by_dtype[d])][1] if by_dtype else None
    return ModelSummary(family=family, model_type=model_type or config.get("model_type"),
                        parameters=sum(t.numel for t in tensors.values()) if tensors else None,
                        towers=list(FAMILY_TOWERS.get(family or "", ())), dtype=dtype,
                        size_bytes=sum(sizes.values()), files=sorted(sizes))


def _read_json(files: ModelFiles, name: str, size: int) -> Any:
    if size > MAX_JSON_BYTES:
        raise InvalidUpload(f"{name} is {size} bytes; a JSON file of a model folder is at most {MAX_JSON_BYTES}.")
    try:
        return json.loads(files.read(name))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidUpload(f"{name} is not valid JSON ({exc}).") from None


def _refuse_remote_code(name: str, document: Any) -> None:
    for path, key in _keys(document, ""):
        if key in REMOTE_CODE_KEYS:
            raise InvalidUpload(f"{name}: {path or key} asks for the model's own code ({key}); models that bring "
                                "code are not accepted (trust_remote_code is never on).")


def _keys(value: Any, path: str) -> Iterator[tuple[str, str]]:
    # Iterative: a hostile JSON nested ten thousand deep must not exhaust the stack.
    stack = [(value, path)]
    while stack:
        current, where = stack.pop()
        if isinstance(current, dict):
            for key, inner in current.items():
                here = f"{where}.{key}" if where else str(key)
                yield here, str(key)
                stack.append((inner, here))
        elif isinstance(current, list):
            stack.extend((inner, f"{where}[{i}]") for i, inner in enumerate(current))


def _check_config(config: Any) -> str:
    if not isinstance(config, dict):
        raise InvalidUpload("config.json is not a JSON object.")
    model_type = config.get("model_type")
    if model_type not in FAMILY_TOWERS:
        raise InvalidUpload(f"config.json: model_type {model_type!r} is not a family this service prunes; "
                            f"families: {', '.join(FAMILY_TOWERS)}.")
    for key in _REQUIRED_KEYS.get(model_type, ()):
        if config.get(key) is None:
            raise InvalidUpload(f"config.json: {key} is missing; a {model_type} config states its sizes.")
    for key in _SUB_CONFIGS.get(model_type, {}).values():
        if not isinstance(config.get(key), dict):
            raise InvalidUpload(f"config.json: {key} is missing or not an object; a {model_type} config states each "
                                "part's sizes.")
    for where, sub in [("", config), *((f"{k}.", config[k]) for k in _SUB_CONFIGS.get(model_type, {}).values())]:
        for key in _SIZE_KEYS:
            value = sub.get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise InvalidUpload(f"config.json: {where}{key} must be a positive integer, not {value!r}.")
    return model_type


# --- weights ---------------------------------------------------------------------------------------------------


def _read_tensors(files: ModelFiles, weights: list[str], sizes: dict[str, int]) -> dict[str, _Tensor]:
    tensors: dict[str, _Tensor] = {}
    for name in weights:
        for tensor_name, tensor in read_safetensors_header(files, name, sizes[name]).items():
            if tensor_name in tensors:
                raise InvalidUpload(f"{name}: tensor {tensor_name!r} is also in {tensors[tensor_name].file}.")
            tensors[tensor_name] = tensor
    return tensors


def read_safetensors_header(files: ModelFiles, name: str, size: int) -> dict[str, _Tensor]:
    """The tensors of a safetensors file from its header alone, checked as the safetensors library checks them:
    known dtypes, whole shapes, and data offsets that tile the data exactly."""
    if size < 8:
        raise InvalidUpload(f"{name} is not a safetensors file (too short).")
    length = int.from_bytes(files.read(name, 0, 8), "little")
    if length > MAX_SAFETENSORS_HEADER or 8 + length > size:
        raise InvalidUpload(f"{name} is not a safetensors file (its header length {length} does not fit the file).")
    try:
        header = json.loads(files.read(name, 8, length))
    except (ValueError, UnicodeDecodeError):
        raise InvalidUpload(f"{name} is not a safetensors file (its header is not JSON).") from None
    if not isinstance(header, dict):
        raise InvalidUpload(f"{name} is not a safetensors file (its header is not a JSON object).")
    tensors: dict[str, _Tensor] = {}
    spans: list[tuple[int, int, str]] = []
    for tensor_name, entry in header.items():
        if tensor_name == "__metadata__":
            continue
        tensor, span = _tensor_entry(name, tensor_name, entry)
        tensors[tensor_name] = tensor
        spans.append((*span, tensor_name))
    end = 0
    for begin, stop, tensor_name in sorted(spans):
        if begin != end:
            raise InvalidUpload(f"{name}: tensor {tensor_name!r}'s data does not start where the previous ends.")
        end = stop
    if end != size - 8 - length:
        raise InvalidUpload(f"{name}: the tensors hold {end} bytes of data, the file {size - 8 - length}.")
    return tensors


def _tensor_entry(file: str, name: str, entry: Any) -> tuple[_Tensor, tuple[int, int]]:
    if not isinstance(entry, dict):
        raise InvalidUpload(f"{file}: tensor {name!r} has no dtype, shape and offsets.")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPES:
        raise InvalidUpload(f"{file}: tensor {name!r} has an unknown dtype {dtype!r}.")
    if (not isinstance(shape, list) or len(shape) > 16
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise InvalidUpload(f"{file}: tensor {name!r} has no valid shape.")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
            or offsets[1] < offsets[0]):
        raise InvalidUpload(f"{file}: tensor {name!r} has no valid data offsets.")
    tensor = _Tensor(dtype, tuple(shape), file)
    if math.ceil(tensor.numel * DTYPES[dtype][0]) != offsets[1] - offsets[0]:
        raise InvalidUpload(f"{file}: tensor {name!r} ({dtype} {list(shape)}) does not fill its "
                            f"{offsets[1] - offsets[0]} bytes.")
    return tensor, (offsets[0], offsets[1])


def _check_index(index: Any, tensors: dict[str, _Tensor], weights: list[str]) -> None:
    if index is None:
        return
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise InvalidUpload("model.safetensors.index.json has no weight_map object.")
    for tensor_name, file in weight_map.items():
        if file not in weights:
            raise InvalidUpload(f"model.safetensors.index.json names {file!r} (for {tensor_name!r}), which the model "
                                "does not have.")
        if tensor_name not in tensors or tensors[tensor_name].file != file:
            raise InvalidUpload(f"model.safetensors.index.json places {tensor_name!r} in {file}, which does not "
                                "hold it.")


# --- shapes: what each family's config says its weights are ----------------------------------------------------

Rule = tuple[re.Pattern[str], Callable[[dict[str, Any]], list[int] | None]]


def _int(cfg: dict[str, Any], *keys: str) -> int | None:
    for key in keys:
        value = cfg.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _dims(*values: int | None) -> list[int] | None:
    """The shape, or None when the config leaves one of its sizes to a default (the rule is then skipped: a
    default is transformers' to know, and a loader that disagrees fails the model later)."""
    return None if any(v is None for v in values) else [v for v in values if v is not None]


def _attention(cfg: dict[str, Any]) -> tuple[int | None, int | None, int | None]:
    hidden, heads = _int(cfg, "hidden_size"), _int(cfg, "num_attention_heads")
    kv_heads = _int(cfg, "num_key_value_heads") or heads
    head_dim = _int(cfg, "head_dim") or (hidden // heads if hidden and heads else None)
    q = heads * head_dim if heads and head_dim else None
    kv = kv_heads * head_dim if kv_heads and head_dim else None
    return hidden, q, kv


def _rule(suffix: str, shape: Callable[[dict[str, Any]], list[int] | None]) -> Rule:
    return re.compile(r"(?:^|\.)" + suffix + "$"), shape


def _mul(a: int | None, b: int | None) -> int | None:
    return a * b if a is not None and b is not None else None


_LLAMA: list[Rule] = [
    _rule(r"embed_tokens\.weight", lambda c: _dims(_int(c, "vocab_size"), _int(c, "hidden_size"))),
    _rule(r"lm_head\.weight", lambda c: _dims(_int(c, "vocab_size"), _int(c, "hidden_size"))),
    _rule(r"self_attn\.q_proj\.weight", lambda c: _dims(_attention(c)[1], _attention(c)[0])),
    _rule(r"self_attn\.(?:k|v)_proj\.weight", lambda c: _dims(_attention(c)[2], _attention(c)[0])),
    _rule(r"self_attn\.o_proj\.weight", lambda c: _dims(_attention(c)[0], _attention(c)[1])),
    _rule(r"self_attn\.q_proj\.bias", lambda c: _dims(_attention(c)[1])),
    _rule(r"self_attn\.(?:k|v)_proj\.bias", lambda c: _dims(_attention(c)[2])),
    _rule(r"mlp\.(?:gate|up)_proj\.weight", lambda c: _dims(_int(c, "intermediate_size"), _int(c, "hidden_size"))),
    _rule(r"mlp\.down_proj\.weight", lambda c: _dims(_int(c, "hidden_size"), _int(c, "intermediate_size"))),
    _rule(r"(?:input_layernorm|post_attention_layernorm|norm)\.weight", lambda c: _dims(_int(c, "hidden_size"))),
]
_OPT: list[Rule] = [
    _rule(r"embed_tokens\.weight",
          lambda c: _dims(_int(c, "vocab_size"), _int(c, "word_embed_proj_dim", "hidden_size"))),
    _rule(r"lm_head\.weight", lambda c: _dims(_int(c, "vocab_size"), _int(c, "word_embed_proj_dim", "hidden_size"))),
    _rule(r"self_attn\.(?:q|k|v|out)_proj\.weight", lambda c: _dims(_int(c, "hidden_size"), _int(c, "hidden_size"))),
    _rule(r"fc1\.weight", lambda c: _dims(_int(c, "ffn_dim"), _int(c, "hidden_size"))),
    _rule(r"fc2\.weight", lambda c: _dims(_int(c, "hidden_size"), _int(c, "ffn_dim"))),
]
_GPT2: list[Rule] = [
    _rule(r"wte\.weight", lambda c: _dims(_int(c, "vocab_size"), _int(c, "n_embd"))),
    _rule(r"wpe\.weight", lambda c: _dims(_int(c, "n_positions"), _int(c, "n_embd"))),
    _rule(r"lm_head\.weight", lambda c: _dims(_int(c, "vocab_size"), _int(c, "n_embd"))),
    _rule(r"attn\.c_attn\.weight", lambda c: _dims(_int(c, "n_embd"), _mul(3, _int(c, "n_embd")))),
    _rule(r"attn\.c_attn\.bias", lambda c: _dims(_mul(3, _int(c, "n_embd")))),
    _rule(r"attn\.c_proj\.weight", lambda c: _dims(_int(c, "n_embd"), _int(c, "n_embd"))),
    _rule(r"mlp\.c_fc\.weight", lambda c: _dims(_int(c, "n_embd"), _int(c, "n_inner") or _mul(4, _int(c, "n_embd")))),
    _rule(r"mlp\.c_proj\.weight", lambda c: _dims(_int(c, "n_inner") or _mul(4, _int(c, "n_embd")), _int(c, "n_embd"))),
]
_ENCODER: list[Rule] = [  # CLIP's text and vision towers, BLIP-2's vision tower
    _rule(r"self_attn\.(?:q|k|v|out)_proj\.weight", lambda c: _dims(_int(c, "hidden_size"), _int(c, "hidden_size"))),
    _rule(r"self_attn\.qkv\.weight", lambda c: _dims(_mul(3, _int(c, "hidden_size")), _int(c, "hidden_size"))),
    _rule(r"self_attn\.projection\.weight", lambda c: _dims(_int(c, "hidden_size"), _int(c, "hidden_size"))),
    _rule(r"mlp\.fc1\.weight", lambda c: _dims(_int(c, "intermediate_size"), _int(c, "hidden_size"))),
    _rule(r"mlp\.fc2\.weight", lambda c: _dims(_int(c, "hidden_size"), _int(c, "intermediate_size"))),
    _rule(r"token_embedding\.weight", lambda c: _dims(_int(c, "vocab_size"), _int(c, "hidden_size"))),
    _rule(r"patch_embedding\.weight", lambda c: _dims(_int(c, "hidden_size"), _int(c, "num_channels"),
                                                      _int(c, "patch_size"), _int(c, "patch_size"))),
]
_QFORMER: list[Rule] = [
    _rule(r"attention\.attention\.(?:query|key|value)\.weight",
          lambda c: _dims(_int(c, "hidden_size"), _int(c, "hidden_size"))),
    _rule(r"intermediate_query\.dense\.weight", lambda c: _dims(_int(c, "intermediate_size"), _int(c, "hidden_size"))),
]
_RULES: dict[str, list[Rule]] = {"llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "opt": _OPT, "gpt2": _GPT2,
                                 "clip_text_model": _ENCODER, "clip_vision_model": _ENCODER,
                                 "blip_2_vision_model": _ENCODER, "blip_2_qformer": _QFORMER}
# A tensor's tower, from its name, in a vision-language model: the first of these its name holds.
_TOWER_MARKS = (("vision", "vision"), ("qformer", "qformer"), ("text_model", "language"),
                ("language_model", "language"))
# Sub-config model_types when a sub-config does not say (transformers' defaults for these families).
_DEFAULT_SUB_TYPES = {("clip", "vision"): "clip_vision_model", ("clip", "language"): "clip_text_model",
                      ("llava", "vision"): "clip_vision_model", ("llava", "language"): "llama",
                      ("blip-2", "vision"): "blip_2_vision_model", ("blip-2", "qformer"): "blip_2_qformer",
                      ("blip-2", "language"): "opt"}
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h)\.(\d+)\.")


def _check_shapes(family: str, config: dict[str, Any], tensors: dict[str, _Tensor]) -> None:
    towers: dict[str, tuple[str, dict[str, Any]]] = {}  # tower -> (model_type, config)
    if family in _SUB_CONFIGS:
        for tower, key in _SUB_CONFIGS[family].items():
            sub = config[key]
            towers[tower] = (sub.get("model_type") or _DEFAULT_SUB_TYPES[(family, tower)], sub)
    else:
        towers["language"] = (family, config)
    grouped: dict[str, dict[str, _Tensor]] = {tower: {} for tower in towers}
    for name, tensor in tensors.items():
        tower = _tower_of(name) if family in _SUB_CONFIGS else "language"
        if tower in grouped:
            grouped[tower][name] = tensor
    for tower, (model_type, cfg) in towers.items():
        where = f"{_SUB_CONFIGS[family][tower]}." if family in _SUB_CONFIGS else ""
        _check_layers(tower, where, cfg, grouped[tower])
        for name, tensor in sorted(grouped[tower].items()):
            for pattern, shape_of in _RULES.get(model_type, ()):
                if pattern.search(name):
                    expected = shape_of(cfg)
                    if expected is not None and list(tensor.shape) != expected:
                        raise InvalidUpload(
                            f"{tensor.file}: tensor {name!r} has shape {list(tensor.shape)}; config.json "
                            f"({where.rstrip('.') or model_type}) makes it {expected}: the weights are not of the "
                            "model the config describes.")
                    break


def _tower_of(name: str) -> str | None:
    for mark, tower in _TOWER_MARKS:
        if mark in name:
            return tower
    return None  # projections between towers, logit scale, query tokens


def _check_layers(tower: str, where: str, cfg: dict[str, Any], tensors: dict[str, _Tensor]) -> None:
    key = "n_layer" if "n_layer" in cfg else "num_hidden_layers"
    stated = _int(cfg, key)
    if stated is None:
        return
    found = {int(m.group(1)) for name in tensors if (m := _LAYER_INDEX.search(name))}
    if not tensors:
        raise InvalidUpload(f"the weights hold no tensor of the {tower} tower that config.json describes.")
    if found != set(range(stated)):
        held = f"{len(found)} (numbered {min(found)} to {max(found)})" if found else "none"
        raise InvalidUpload(f"config.json: {where}{key} is {stated}, but the weights hold {held} of the "
                            f"{tower} tower's layers.")


# --- a registered s3:// prefix, read in place ------------------------------------------------------------------


@dataclass
class S3ModelFiles:
    """An HF folder under an `s3://` prefix, read by the API without downloading its weights: the listing, the
    JSON files, and the first bytes of each safetensors file (its header). Short timeouts and few retries: the
    caller waits for the answer."""

    bucket: str
    prefix: str
    endpoint_url: str | None = None
    region: str = "us-east-1"

    def __post_init__(self) -> None:
        import boto3
        from botocore.config import Config

        self.client = boto3.client("s3", endpoint_url=self.endpoint_url, region_name=self.region,
                                   config=Config(signature_version="s3v4", connect_timeout=3, read_timeout=10,
                                                 retries={"max_attempts": 2, "mode": "standard"},
                                                 s3={"addressing_style": "path"}))
        self._sizes: dict[str, int] | None = None

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def sizes(self) -> dict[str, int]:
        if self._sizes is None:
            base = f"{self.prefix}/" if self.prefix else ""
            found: dict[str, int] = {}
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base):
                for obj in page.get("Contents", []):
                    found[obj["Key"][len(base):]] = int(obj["Size"])
                    if len(found) > 10_000:
                        raise InvalidUpload(f"s3://{self.bucket}/{self.prefix} holds more than 10000 files; it is "
                                            "not one model folder.")
            self._sizes = found
        return self._sizes

    def read(self, name: str, start: int = 0, length: int | None = None) -> bytes:
        extra = {} if length is None else {"Range": f"bytes={start}-{start + max(length, 1) - 1}"}
        if length == 0:
            return b""
        body = self.client.get_object(Bucket=self.bucket, Key=self._key(name), **extra)["Body"]
        return bytes(body.read())
