"""Pydantic models of the HTTP contract (../shared/api.md)."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError
from sqlalchemy import Row

from app import capabilities as caps
from app.schema_rules import job_rules
from prunekit.core.db.models import Dataset, Job, JobEvent
from prunekit.core.documents import epoch, job_document
from prunekit.vocabulary import (
    ALLOCATION,
    ALLOCATIONS,
    BUDGET,
    BUDGET_BOUNDS,
    BUILTIN_TASKS,
    CALIBRATION,
    EVALUATION,
    GRANULARITIES,
    METHODS,
    OFFLOAD,
    OFFLOAD_CPU,
    OFFLOAD_MEMORY,
    PATTERN,
    PATTERNS,
    PERTURBATIONS,
    RESTORE,
    RESTORE_METHODS,
    UNIFORM,
    JobStatus,
    allocation_decides,
    allocation_fits_pattern,
    fits_pattern,
    fixed_sparsity,
    in_open_unit,
    offload_mode,
    same_sparsity,
    sweep_fits_pattern,
)

# Literal types of the vocabulary's names: the OpenAPI schema lists them as enums.
MethodName = Literal[METHODS]  # type: ignore[valid-type]
PatternName = Literal[PATTERNS]  # type: ignore[valid-type]
AllocationName = Literal[ALLOCATIONS]  # type: ignore[valid-type]
GranularityName = Literal[GRANULARITIES]  # type: ignore[valid-type]
PerturbationName = Literal[PERTURBATIONS]  # type: ignore[valid-type]
RestoreMethodName = Literal[RESTORE_METHODS]  # type: ignore[valid-type]
JobStatusName = Literal[tuple(status.value for status in JobStatus)]  # type: ignore[valid-type]

# Each pattern is published in the OpenAPI document as the validators below apply it (with fullmatch: a
# trailing newline never slips past `$`), so that what the schema allows is what the server accepts. They use only
# what ECMA 262 and Python's `re` read alike.
S3_URL_PATTERN = r"s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[A-Za-z0-9!_.*'()/-]*)?"
# a tenant's model by its id (mdl_...), and a finished job's pruned model (job:<id>[/sparsity-<s>]).
TENANT_MODEL_REF = r"mdl_[0-9A-Z]{26}"
JOB_MODEL_REF = r"job:job_[0-9A-Z]{26}(/sparsity-[0-9][0-9.e-]{0,15})?"
MODEL_REF_PATTERN = (r"^(local:[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
                     r"|hf:[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}(@[A-Za-z0-9._/-]{1,128})?"
                     rf"|{S3_URL_PATTERN}|{TENANT_MODEL_REF}|{JOB_MODEL_REF})$")
# No form of reference has a `..` (a path out of the models root or the bucket prefix; Hugging Face forbids it in
# names and git in revisions): the schema says so with `not`, as lookarounds are not portable.
_PARENT = ".."
JOB_ID_PATTERN = r"^job_[0-9A-Z]{26}$"
DATASET_ID_PATTERN = r"^ds_[0-9A-Z]{26}$"
ARTIFACT_ID_PATTERN = r"^art_[0-9A-Z]{26}$"
MODEL_ID_PATTERN = r"^mdl_[0-9A-Z]{26}$"
DATASET_REF_PATTERN = "^(" + "|".join([*caps.BUILTIN_DATASETS, DATASET_ID_PATTERN.strip("^$")]) + ")$"
LAYER_SUFFIX_PATTERN = r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$"
# evaluation.tasks items, a built-in task or an uploaded task file.
TASK_REF_PATTERN = "^(" + "|".join([*BUILTIN_TASKS, DATASET_ID_PATTERN.strip("^$")]) + ")$"
_TASK_REF = re.compile(TASK_REF_PATTERN)
WEBHOOK_URL_CHARS = 2000
METADATA_KEY_CHARS = 64
_MODEL_REF = re.compile(MODEL_REF_PATTERN)
_DATASET_ID = re.compile(DATASET_ID_PATTERN)
_LAYER_SUFFIX = re.compile(LAYER_SUFFIX_PATTERN)
_IDS = {prefix: re.compile(pattern) for prefix, pattern in
        (("job", JOB_ID_PATTERN), ("ds", DATASET_ID_PATTERN), ("art", ARTIFACT_ID_PATTERN),
         ("mdl", MODEL_ID_PATTERN))}


def is_id(prefix: str, value: str) -> bool:
    """Whether `value` can be an id of this kind: routes answer 404 for any other without asking the database
    (which, for one, refuses NUL characters outright)."""
    return _IDS[prefix].fullmatch(value) is not None


def check_model_ref(ref: str) -> str:
    if not _MODEL_REF.fullmatch(ref) or _PARENT in ref:
        raise ValueError(
            "must be local:<name> (a model under the server's models root), hf:<org>/<name>[@revision], "
            "s3://bucket/prefix, a model of yours (mdl_...) or a finished job's model (job:<id>, "
            "job:<id>/sparsity-<s> for a sweep)"
        )
    return ref


def check_dataset_ref(value: str) -> str:
    # Uploaded datasets (ds_...) are checked against the caller's tenant by the route.
    if value not in caps.BUILTIN_DATASETS and not _DATASET_ID.fullmatch(value):
        raise ValueError(f"unknown dataset {value!r}; use an uploaded dataset id (ds_...) or one of: "
                         f"{', '.join(caps.BUILTIN_DATASETS)}")
    return value


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Calibration(Strict):
    # A CLIP model left at this default calibrates on builtin:digits; the job's report names the dataset used.
    dataset: str = Field(CALIBRATION.dataset, json_schema_extra={"pattern": DATASET_REF_PATTERN})
    num_samples: int = Field(CALIBRATION.num_samples, ge=1, le=caps.LIMITS["calibration_num_samples"])
    seq_len: int = Field(CALIBRATION.seq_len, ge=16, le=caps.LIMITS["calibration_seq_len"])
    seed: int = Field(CALIBRATION.seed, ge=0, le=2**31 - 1)

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, value: str) -> str:
        return check_dataset_ref(value)


class Evaluation(Strict):
    perplexity: bool = EVALUATION.perplexity
    accuracy: bool = Field(EVALUATION.accuracy,
                           description="CLIP-style models: zero-shot accuracy on builtin:digits' held-out split, "
                                       "dense and pruned (metrics.accuracy)")
    num_samples: int = Field(EVALUATION.num_samples, ge=1, le=caps.LIMITS["evaluation_num_samples"])
    seq_len: int = Field(EVALUATION.seq_len, ge=16, le=caps.LIMITS["evaluation_seq_len"])
    # multiple-choice tasks scored dense and pruned by log-likelihood (lm-eval), in metrics.tasks.
    tasks: list[str] = Field(default_factory=lambda: list(EVALUATION.tasks), max_length=caps.LIMITS["evaluation_tasks"],
                             description="language models: builtin:wiki-next-sentence or an uploaded task file "
                                         "(ds_..., kind task); zero-shot acc and acc_norm, dense and pruned "
                                         "(metrics.tasks)",
                             json_schema_extra={"uniqueItems": True, "items": {"type": "string",
                                                                               "pattern": TASK_REF_PATTERN}})
    task_num_samples: int = Field(EVALUATION.task_num_samples, ge=1, le=caps.LIMITS["evaluation_task_num_samples"],
                                  description="items per task: the built-in task draws this many, an uploaded "
                                              "file's first this many are scored")

    @field_validator("tasks")
    @classmethod
    def _task_refs(cls, value: list[str]) -> list[str]:
        for ref in value:
            if not _TASK_REF.fullmatch(ref):
                raise ValueError(f"unknown task {ref!r}; use an uploaded task file's id (ds_...) or one of: "
                                 f"{', '.join(BUILTIN_TASKS)}")
        if len(set(value)) != len(value):
            raise ValueError("tasks must be distinct")
        return value


def _block_perturbation_rule(schema: dict[str, Any]) -> None:
    # _block_needs_block: perturbation block scores whole blocks, so the granularity stays block.
    schema["if"] = {"required": ["perturbation"], "properties": {"perturbation": {"const": "block"}}}
    schema["then"] = {"properties": {"granularity": {"const": "block"}}}


class AllocationOptions(Strict):
    model_config = ConfigDict(extra="forbid", json_schema_extra=_block_perturbation_rule)

    granularity: GranularityName = Field(ALLOCATION.granularity, description="one sparsity per block or per layer")
    max_sparsity: float | None = Field(ALLOCATION.max_sparsity, gt=0, lt=1,
                                       description="ECoFLaP: no group is pruned beyond this; default target + 0.1")
    num_samples: int | None = Field(ALLOCATION.num_samples, ge=1, le=caps.LIMITS["allocation_num_samples"],
                                    description="calibration samples the scores are estimated on; default 16 for "
                                                "ecoflap-zeroth's block perturbation, else 8")
    seq_len: int | None = Field(ALLOCATION.seq_len, ge=16, le=caps.LIMITS["calibration_seq_len"],
                                description="tokens per scoring sample (language models); default 32 for "
                                            "ecoflap-zeroth's block perturbation, else the calibration's")
    eps: float = Field(ALLOCATION.eps, gt=0, le=0.1, description="ecoflap-zeroth: the perturbation's size")
    outlier_multiple: float = Field(ALLOCATION.outlier_multiple, gt=1, le=100,
                                    description="owl: M, outliers exceed M x the mean score")
    spread: float = Field(ALLOCATION.spread, ge=0, lt=0.5,
                          description="owl: lambda, sparsities in [s - lambda, s + lambda]")
    # --- allocation options of alphapruning, dlp and ecoflap-zeroth ---
    perturbation: PerturbationName | None = Field(
        ALLOCATION.perturbation, description="ecoflap-zeroth: one random direction per weight matrix (tensor) or "
                                             "per block (block: 7x fewer forward passes on Llama; granularity block); "
                                             "default block at granularity block, tensor at granularity layer")
    epsilon: float = Field(ALLOCATION.epsilon, ge=0, lt=1,
                           description="alphapruning: sparsities proportional to [1 - epsilon, 1 + epsilon], mapped "
                                       "from each block's heavy-tail exponent")
    alpha: float = Field(ALLOCATION.alpha, ge=0, lt=0.5,
                         description="dlp: sparsities in [s - alpha, s + alpha], from each block's median "
                                     "|W| x ||X|| score")

    @field_validator("perturbation")
    @classmethod
    def _block_needs_block(cls, value: str, info: ValidationInfo) -> str:
        if value == "block" and info.data.get("granularity", ALLOCATION.granularity) != "block":
            raise ValueError("block scores whole blocks: it needs granularity block")
        return value


class Sweep(Strict):
    sparsities: list[float] = Field(min_length=1, max_length=caps.LIMITS["sweep_sparsities"],
                                    description="one pruned model and one metrics row per sparsity",
                                    json_schema_extra={"uniqueItems": True, "items": {
                                        "type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}})

    @field_validator("sparsities")
    @classmethod
    def _in_range(cls, value: list[float]) -> list[float]:
        if not all(in_open_unit(s) for s in value):
            raise ValueError("each sparsity must be between 0 and 1 (exclusive)")
        if len(set(value)) != len(value):
            raise ValueError("sparsities must be distinct")
        return sorted(value)


def _whole_steps_or_fraction(schema: dict[str, Any]) -> None:
    # What the validator below accepts: a whole number of steps (5.0 counts, as JSON Schema's integer does), or a
    # fraction strictly between 0 and 1.
    for key in ("minimum", "maximum", "ge", "le"):
        schema.pop(key, None)
    schema["anyOf"] = [{"type": "integer", "minimum": 0, "maximum": caps.LIMITS["restore_steps"]},
                       {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}]


class Restore(Strict):
    method: RestoreMethodName = Field(
        RESTORE.method, description="sparse-lora keeps exactly the pruned zeros; lora (plain, for comparison) does not")
    steps: int = Field(RESTORE.steps, ge=1, le=caps.LIMITS["restore_steps"])
    rank: int = Field(RESTORE.rank, ge=1, le=caps.LIMITS["restore_rank"])
    alpha: float = Field(RESTORE.alpha, gt=0, allow_inf_nan=False, description="the update is scaled by alpha / rank")
    lr: float = Field(RESTORE.lr, gt=0, le=1, description="peak learning rate (AdamW)")
    distill: float = Field(RESTORE.distill, ge=0, le=1,
                           description="weight of KL(dense teacher || student) in the loss")
    batch_size: int = Field(RESTORE.batch_size, ge=1, le=caps.LIMITS["restore_batch_size"])
    warmup_steps: int | float = Field(RESTORE.warmup_steps, ge=0, le=caps.LIMITS["restore_steps"],
                                      description="linear warm-up before the cosine decay: a number of steps (at "
                                                  "most `steps`), or a fraction in (0, 1)",
                                      json_schema_extra=_whole_steps_or_fraction)
    dataset: str | None = Field(None, description="default: the calibration dataset; else builtin:... or ds_...",
                                json_schema_extra={"pattern": DATASET_REF_PATTERN})
    targets: list[str] | None = Field(None, min_length=1, max_length=64,
                                      description="layer-name suffixes to adapt (q_proj, mlp.fc1); default: every "
                                                  "pruned layer",
                                      json_schema_extra={"items": {"type": "string", "maxLength": 200,
                                                                   "pattern": LAYER_SUFFIX_PATTERN}})

    @field_validator("warmup_steps")
    @classmethod
    def _warmup(cls, value: int | float) -> int | float:
        # More warm-up than steps is not refused: the default (10) must work for a short run; it is capped.
        if 0 < value < 1:
            return value
        if not float(value).is_integer():
            raise ValueError("must be a whole number of steps or a fraction in (0, 1)")
        return int(value)

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, value: str | None) -> str | None:
        return value if value is None else check_dataset_ref(value)

    @field_validator("targets")
    @classmethod
    def _suffixes(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and any(len(t) > 200 or not _LAYER_SUFFIX.fullmatch(t) for t in value):
            raise ValueError("each target is a layer-name suffix such as q_proj or mlp.fc1")
        return value


class Webhook(Strict):
    url: HttpUrl = Field(description="http(s) URL that receives pruning.job.succeeded|failed|cancelled",
                         json_schema_extra={"maxLength": WEBHOOK_URL_CHARS, "pattern": "^[Hh][Tt][Tt][Pp][Ss]?://"})

    @field_validator("url", mode="before")
    @classmethod
    def _bounded(cls, value: Any) -> Any:
        # The URL as sent is what the schema's maxLength counts (parsing may add a slash or punycode).
        if isinstance(value, str) and len(value) > WEBHOOK_URL_CHARS:
            raise ValueError(f"at most {WEBHOOK_URL_CHARS} characters")
        return value


# --- quality-budget jobs ---------------------------------------------------------------------------


def _one_bound(schema: dict[str, Any]) -> None:
    # What _exactly_one_bound accepts: one of the two bounds as a number (the other left out or null).
    schema["oneOf"] = [{"required": [name], "properties": {name: {"type": "number"}}} for name in BUDGET_BOUNDS]


class Budget(Strict):
    """The highest sparsity whose pruned model keeps a quality bound, measured on the evaluation data."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_one_bound)

    max_perplexity_ratio: float | None = Field(
        None, gt=1, le=1e6, allow_inf_nan=False,
        description="language models: pruned perplexity / dense perplexity at most this")
    max_accuracy_drop: float | None = Field(
        None, ge=0, lt=1, allow_inf_nan=False,
        description="CLIP-style models: dense zero-shot accuracy - pruned accuracy at most this")
    min_sparsity: float = Field(BUDGET.min_sparsity, gt=0, lt=1, description="the lowest sparsity searched")
    max_sparsity: float = Field(BUDGET.max_sparsity, gt=0, lt=1,
                                description="the highest sparsity searched (at least min_sparsity)")
    step: float = Field(BUDGET.step, ge=0.001, le=0.5,
                        description="the grid's spacing: min_sparsity, min_sparsity + step, ..., max_sparsity")

    @model_validator(mode="after")
    def _exactly_one_bound(self) -> Budget:
        if (self.max_perplexity_ratio is None) == (self.max_accuracy_drop is None):
            raise ValueError("names exactly one bound: max_perplexity_ratio (language models) or max_accuracy_drop "
                             "(CLIP-style models)")
        if self.min_sparsity > self.max_sparsity:
            raise ValueError(f"min_sparsity ({self.min_sparsity}) is above max_sparsity ({self.max_sparsity})")
        return self


class JobCreate(Strict):
    model_config = ConfigDict(extra="forbid", json_schema_extra=lambda schema: _job_schema(schema))

    model: str = Field(description="local:<name> | hf:<org>/<name>[@revision] | s3://bucket/prefix | mdl_... (a model "
                                   "of yours, GET /v1/models) | job:<id>[/sparsity-<s>] (a finished job's model)",
                       json_schema_extra={"pattern": MODEL_REF_PATTERN, "not": {"pattern": r"\.\."}})
    method: MethodName
    # pattern comes before sparsity so that sparsity's validator can see it (fields validate in order).
    pattern: PatternName = PATTERN
    # Required, except with a sweep (it is then the sweep's lowest sparsity): the route checks that.
    sparsity: float | None = Field(None, gt=0, lt=1, description="required unless a sweep or a budget is given")
    allocation: AllocationName = ALLOCATION.name
    allocation_options: AllocationOptions | None = Field(None, validate_default=True)
    targets: dict[str, float] | None = Field(None, json_schema_extra={
        "minProperties": 1, "propertyNames": {"enum": list(caps.TOWERS)},
        "additionalProperties": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}})
    # Before `restore`, whose validator reads it (the refusal of the two together names `restore`).
    offload: Literal[False, True, "cpu", "disk"] = Field(
        OFFLOAD, description="false: the model in memory (unless it exceeds the worker's memory budget, which then "
                             "streams it from disk); true or \"cpu\": in CPU memory, one block at a time on the "
                             "worker's GPU; \"disk\": streamed from its files one block at a time, pruned blocks "
                             "written straight to the output")
    restore: Restore | None = Field(None, description="LoRA fine-tuning after pruning; sparse-lora keeps the "
                                                     "model exactly sparse")
    sweep: Sweep | None = None
    calibration: Calibration = Field(default_factory=Calibration)
    evaluation: Evaluation = Field(default_factory=Evaluation)
    metadata: dict[str, str] = Field(default_factory=dict, json_schema_extra={
        "maxProperties": caps.LIMITS["metadata_keys"], "propertyNames": {"maxLength": METADATA_KEY_CHARS},
        "additionalProperties": {"type": "string", "maxLength": caps.LIMITS["metadata_value_chars"]}})
    webhook: Webhook | None = None
    # Last, so that its validator sees every other field.
    budget: Budget | None = Field(None, description="search the highest sparsity within a quality bound instead of "
                                                    "giving `sparsity`")

    @field_validator("model")
    @classmethod
    def _model_ref(cls, value: str) -> str:
        return check_model_ref(value)

    @field_validator("method", "pattern", "allocation")
    @classmethod
    def _available(cls, value: str, info: ValidationInfo) -> str:
        allowed = {"method": caps.METHODS, "pattern": caps.PATTERNS, "allocation": caps.ALLOCATIONS}[info.field_name]
        if value not in allowed:
            raise ValueError(f"{info.field_name} {value!r} is not available on this server; "
                             f"available: {', '.join(allowed)}")
        return value

    @field_validator("sparsity")
    @classmethod
    def _fixed_by_pattern(cls, value: float | None, info: ValidationInfo) -> float | None:
        pattern = info.data.get("pattern")  # absent when the pattern itself was invalid
        # An explicit null is left out (the route asks for a sweep then); it used to reach fits_pattern, a 500.
        if value is not None and not fits_pattern(value, pattern):
            fixed = fixed_sparsity(pattern)
            raise PydanticCustomError("sparsity_fixed_by_pattern", "pattern {pattern} fixes sparsity at {fixed}",
                                      {"pattern": pattern, "fixed": f"{fixed:g}"})
        return value

    @field_validator("targets")
    @classmethod
    def _known_towers(cls, value: dict[str, float] | None, info: ValidationInfo) -> dict[str, float] | None:
        if value is None:
            return value
        if not value:
            raise ValueError(f"names at least one tower of: {', '.join(caps.TOWERS)}")
        unknown = sorted(set(value) - set(caps.TOWERS))
        if unknown:
            raise ValueError(f"unknown tower {', '.join(map(repr, unknown))}; towers: {', '.join(caps.TOWERS)}")
        outside = {name: s for name, s in value.items() if not in_open_unit(s)}
        if outside:
            raise ValueError(f"each tower's sparsity must be between 0 and 1 (exclusive); got {outside}")
        pattern = info.data.get("pattern")
        # As for `sparsity`: an N:M pattern fixes every tower's sparsity too.
        if not all(fits_pattern(s, pattern) for s in value.values()):
            raise ValueError(f"pattern {pattern} fixes every tower's sparsity at {fixed_sparsity(pattern):g}")
        return value

    @field_validator("allocation_options")
    @classmethod
    def _options_fit(cls, value: AllocationOptions | None, info: ValidationInfo) -> AllocationOptions | None:
        allocation, pattern = info.data.get("allocation"), info.data.get("pattern")
        if allocation == UNIFORM and value is not None and value.model_fields_set:
            raise ValueError(f"only applies to a non-uniform allocation ({', '.join(ALLOCATIONS[1:])})")
        if allocation and allocation_decides(allocation):
            value = value or AllocationOptions()
            if not allocation_fits_pattern(allocation, pattern):
                raise PydanticCustomError("allocation_with_nm", "pattern {pattern} fixes every layer's sparsity, so "
                                          "allocation {allocation} has nothing to decide; use allocation uniform",
                                          {"pattern": pattern, "allocation": allocation})
            sparsity = info.data.get("sparsity")
            if value.max_sparsity is not None and sparsity is not None and value.max_sparsity < sparsity:
                raise ValueError(f"max_sparsity ({value.max_sparsity}) must be at least the target sparsity "
                                 f"({sparsity})")
        return value

    @field_validator("sweep")
    @classmethod
    def _sweep_fits(cls, value: Sweep | None, info: ValidationInfo) -> Sweep | None:
        if value is None:
            return value
        pattern = info.data.get("pattern")
        if not sweep_fits_pattern(pattern):
            raise ValueError(f"pattern {pattern} fixes the sparsity; a sweep has nothing to vary")
        if info.data.get("targets") is not None:
            raise ValueError("cannot be combined with per-tower targets")
        sparsity = info.data.get("sparsity")
        if sparsity is not None and not any(same_sparsity(sparsity, s) for s in value.sparsities):
            raise ValueError(f"must include the job's sparsity ({sparsity}), or leave sparsity out")
        options = info.data.get("allocation_options")
        if options is not None and options.max_sparsity is not None and options.max_sparsity < max(value.sparsities):
            raise ValueError(f"allocation_options.max_sparsity ({options.max_sparsity}) is below the sweep's "
                             f"largest sparsity ({max(value.sparsities)})")
        return value

    @field_validator("offload")
    @classmethod
    def _one_name(cls, value: bool | str) -> bool | str:
        # true is "cpu" by its first name; false stays false (in memory unless the worker streams it).
        return OFFLOAD_CPU if value is True else value

    @field_validator("restore")
    @classmethod
    def _not_with_offload(cls, value: Restore | None, info: ValidationInfo) -> Restore | None:
        offload = info.data.get("offload", OFFLOAD)
        if value is not None and offload_mode(offload) != OFFLOAD_MEMORY:
            raise ValueError(f"cannot be combined with offload \"{offload_mode(offload)}\": training needs the "
                             "whole model on the device, which offloading and streaming are for models too large to "
                             "hold")
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata_bounds(cls, value: dict[str, str]) -> dict[str, str]:
        if len(value) > caps.LIMITS["metadata_keys"]:
            raise ValueError(f"at most {caps.LIMITS['metadata_keys']} keys")
        longest = caps.LIMITS["metadata_value_chars"]
        if any(len(k) > METADATA_KEY_CHARS or len(v) > longest for k, v in value.items()):
            raise ValueError(f"keys up to {METADATA_KEY_CHARS} characters, values up to {longest}")
        return value

    @field_validator("budget")
    @classmethod
    def _budget_alone(cls, value: Budget | None, info: ValidationInfo) -> Budget | None:
        """A budget chooses the one sparsity of every tower itself: nothing else may give one."""
        if value is None:
            return value
        clashes = [name for name in ("sparsity", "sweep", "targets") if info.data.get(name) is not None]
        if clashes:
            raise ValueError(f"cannot be combined with {' or '.join(clashes)}: the budget search chooses the sparsity")
        pattern = info.data.get("pattern")
        if not sweep_fits_pattern(pattern):
            raise ValueError(f"pattern {pattern} fixes the sparsity; a budget has nothing to search")
        evaluation = info.data.get("evaluation")
        if value.max_perplexity_ratio is not None and evaluation is not None and not evaluation.perplexity:
            raise ValueError("max_perplexity_ratio is measured on the evaluation windows: evaluation.perplexity "
                             "must stay on")
        if value.max_accuracy_drop is not None and evaluation is not None and not evaluation.accuracy:
            raise ValueError("max_accuracy_drop is measured as zero-shot accuracy: evaluation.accuracy must stay on")
        options = info.data.get("allocation_options")
        if options is not None and options.max_sparsity is not None and options.max_sparsity < value.max_sparsity:
            raise ValueError(f"budget.max_sparsity ({value.max_sparsity}) is above allocation_options.max_sparsity "
                             f"({options.max_sparsity})")
        return value


def _job_schema(schema: dict[str, Any]) -> None:
    job_rules(schema)
    # Requests as docs/api.md shows them; the first names a model a server may well not have (422 unknown_model).
    schema["examples"] = [
        {"model": "local:smollm2-135m", "method": "wanda", "sparsity": 0.5, "metadata": {"team": "search"}},
        {"model": "hf:HuggingFaceTB/SmolLM2-135M", "method": "sparsegpt", "pattern": "2:4", "sparsity": 0.5},
        {"model": "hf:HuggingFaceTB/SmolLM2-135M", "method": "wanda", "allocation": "owl",
         "sweep": {"sparsities": [0.5, 0.6, 0.7]}},
    ]


class JobOut(BaseModel):
    id: str
    object: Literal["pruning.job"] = "pruning.job"
    status: JobStatusName
    created_at: int
    started_at: int | None
    finished_at: int | None
    request: dict[str, Any]
    progress: dict[str, Any] | None
    metrics: dict[str, Any] | None
    error: dict[str, Any] | None
    metadata: dict[str, str]


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobOut]
    has_more: bool


class EventOut(BaseModel):
    id: int
    created_at: int
    level: Literal["info", "warning", "error"]
    type: Literal["message", "progress", "metrics"]
    message: str
    data: dict[str, Any] | None


class EventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EventOut]
    has_more: bool


class ArtifactOut(BaseModel):
    id: str
    object: Literal["artifact"] = "artifact"
    name: str
    size_bytes: int
    sha256: str
    content_type: str
    created_at: int


class ArtifactList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ArtifactOut]
    has_more: bool = False


def job_out(job: Job | Row[Any] | tuple[Any, ...]) -> JobOut:
    """From a Job, or a row of queries.job_view_statement; the webhooks send the same document."""
    return JobOut(**job_document(job))


def event_out(event: JobEvent) -> EventOut:
    return EventOut(id=event.id, created_at=epoch(event.created_at) or 0, level=event.level, type=event.type,
                    message=event.message, data=event.data)


class DatasetOut(BaseModel):
    id: str
    object: Literal["dataset"] = "dataset"
    name: str
    kind: Literal["text", "image-text", "task"]  # task: an uploaded task file
    num_records: int
    size_bytes: int
    sha256: str
    created_at: int


class DatasetList(BaseModel):
    object: Literal["list"] = "list"
    data: list[DatasetOut]
    has_more: bool


def dataset_out(ds: Dataset) -> DatasetOut:
    return DatasetOut(id=ds.id, name=ds.name, kind=ds.kind, num_records=ds.num_records,  # type: ignore[arg-type]
                      size_bytes=ds.size_bytes, sha256=ds.sha256, created_at=epoch(ds.created_at) or 0)


# --- the models API (GET/POST /v1/models) -----------------------------------------------------------------


class ModelError(BaseModel):
    code: str
    message: str


class ModelOut(BaseModel):
    id: str | None = Field(description="mdl_... for a model of yours; null for the server's models")
    object: Literal["model"] = "model"
    ref: str = Field(description="the value of a job's `model` that names this model")
    name: str
    owner: Literal["server", "tenant"]
    source: str = Field(description="server, upload, or the registered s3:// prefix")
    status: Literal["ready", "building", "failed"]
    ready: bool
    family: str | None
    model_type: str | None
    parameters: int | None
    towers: list[str]
    dtype: str | None
    size_bytes: int | None
    error: ModelError | None = None
    created_at: int | None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelOut]
    has_more: bool


class ProblemOut(BaseModel):
    type: str
    title: str
    status: int
    detail: str
    code: str
    param: str | None = None
