"""Requests the schema allows and the server still refuses, each with the reason the schema cannot say it.

The published document states every other rule (patterns, lengths, ranges, the fields that go together:
app/schemas.py, app/schema_rules.py). What is left needs the server's state (a folder, a tenant's dataset, the
kind of a model), compares two numbers of one request, or reads an uploaded file's contents. Each operation's
`422` response lists its refusals (`x-refusals`: `code`, `param`, `reason`), so a client, and the contract test,
can tell a documented refusal from a schema that says too little.
"""

from __future__ import annotations

from typing import NamedTuple


class Refusal(NamedTuple):
    code: str
    param: str
    reason: str


REFUSALS: dict[tuple[str, str], tuple[Refusal, ...]] = {
    ("post", "/v1/jobs"): (
        Refusal("unknown_model", "model", "local:<name> names no folder under the server's models root; mdl_... no "
                "model of this tenant; job:<id> no job of this tenant, or a sweep's model it does not have"),
        Refusal("model_not_ready", "model", "a server model still being built, a model of the tenant's that the "
                "worker could not load, or a job:<id> that has not succeeded"),
        Refusal("dataset_not_found", "calibration.dataset", "an uploaded dataset this tenant does not have"),
        Refusal("dataset_not_found", "restore.dataset", "an uploaded dataset this tenant does not have"),
        Refusal("incompatible_dataset", "calibration.dataset",
                "an image-text dataset with a local model without a vision tower"),
        Refusal("incompatible_dataset", "restore.dataset",
                "an image-text dataset with a local text-only model, or a text dataset with a local CLIP model"),
        Refusal("invalid_request", "restore.batch_size",
                "a local CLIP model is restored with a contrastive loss: at least two pairs a batch"),
        Refusal("invalid_request", "webhook.url",
                "an address that is not public (loopback, private, link-local, ...), unless the server allows it"),
        Refusal("invalid_request", "allocation_options", "max_sparsity below the target sparsity"),
        Refusal("invalid_request", "sweep",
                "a sweep that does not include the job's sparsity, or whose largest sparsity is above "
                "allocation_options.max_sparsity"),
        Refusal("invalid_request", "budget",
                "budget.min_sparsity above budget.max_sparsity, or budget.max_sparsity above "
                "allocation_options.max_sparsity"),
        Refusal("invalid_request", "budget.max_accuracy_drop",
                "a local model that is not CLIP-style: it has no zero-shot accuracy"),
        Refusal("invalid_request", "budget.max_perplexity_ratio", "a local CLIP model: it has no perplexity"),
        # evaluation.tasks
        Refusal("dataset_not_found", "evaluation.tasks", "an uploaded task file this tenant does not have"),
        Refusal("incompatible_dataset", "evaluation.tasks", "an uploaded dataset that is not a task file"),
        Refusal("invalid_request", "evaluation.tasks", "a CLIP model: it has no log-likelihood to score tasks with"),
        Refusal("incompatible_dataset", "calibration.dataset", "a task file: it holds no text to calibrate on"),
        Refusal("incompatible_dataset", "restore.dataset", "a task file: it holds no text to train on"),
    ),
    ("post", "/v1/models"): (
        Refusal("invalid_request", "file", "neither a file nor a source (exactly one of the two)"),
        Refusal("invalid_request", "source", "both a file and a source, or a source that is no s3://bucket/prefix"),
        Refusal("invalid_upload", "file",
                "the archive's contents: a .zip, .tar or .tar.gz of an HF folder with config.json and safetensors "
                "weights; no pickles, code, auto_map or trust_remote_code, links or entries outside the archive; "
                "within the size and entry limits; a config of a supported family whose sizes match the weights"),
        Refusal("invalid_model", "source", "the s3:// prefix cannot be read, or holds no model that passes the "
                "same checks as an archive"),
    ),
    ("post", "/v1/datasets"): (
        Refusal("invalid_upload", "file",
                "the file's contents: its kind by extension (.txt, .jsonl, .zip), UTF-8 text, JSON records with a "
                "text field (or, for a task file, context, choices and answer), at least one record, and for "
                "archives their structure and safety limits"),
    ),
}
