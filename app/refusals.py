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
        Refusal("unknown_model", "model", "local:<name> names no folder under the server's models root"),
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
    ),
    ("post", "/v1/datasets"): (
        Refusal("invalid_upload", "file",
                "the file's contents: its kind by extension (.txt, .jsonl, .zip), UTF-8 text, JSON records with a "
                "text field, at least one record, and for archives their structure and safety limits"),
    ),
}
