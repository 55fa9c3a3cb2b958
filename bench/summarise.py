"""Markdown tables from benchmark results, for pasting into bench/README.md.

    python bench/summarise.py                      # every bench/results/*.json
    python bench/summarise.py bench/results/quality-smollm2-quick.json

A results file is either a list of rows or an object with "rows" (main-job.json); a column appears when any row
of the file has its key, so every benchmark's results print with the same script.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import RESULTS_DIR


def _num(digits: int) -> Callable[[Any], str]:
    return lambda value: f"{value:.{digits}f}"


def _yes_no(value: Any) -> str:
    return "yes" if value else "**no**"


# (key, header, format): the order columns appear in.
COLUMNS: list[tuple[str, str, Callable[[Any], str]]] = [
    ("config", "config", str),
    ("method", "method", str),
    ("allocation", "allocation", str),
    ("pattern", "pattern", str),
    ("sparsity", "target", _num(2)),
    ("achieved_sparsity", "achieved", _num(6)),
    ("perplexity", "perplexity", _num(2)),
    ("dense_perplexity", "dense ppl", _num(2)),
    ("accuracy", "accuracy", _num(4)),
    ("dense_accuracy", "dense acc", _num(4)),
    ("per_tower_sparsity", "per tower", lambda v: ", ".join(f"{k} {x:.4f}" for k, x in v.items())),
    ("allocation_per_tower", "split chosen", lambda v: ", ".join(f"{k} {x:.3f}" for k, x in v.items())),
    ("prune_over_dense_forward", "prune / dense fwd", lambda v: f"{v:.2f}x"),
    ("scoring_over_dense_forward", "scoring / dense fwd", lambda v: f"{v:.2f}x"),
    ("peak_rss_mb", "peak RSS MB", _num(0)),
    ("rss_bound_mb", "bound MB", _num(0)),
    ("within_rss_bound", "within", _yes_no),
    ("pruning_peak_rss_mb", "pruning-stage RSS MB", _num(0)),
    ("pruning_within_rss_bound", "within", _yes_no),
    # bench/restore.py
    ("restore_method", "restore", str),
    ("before", "before", lambda v: f"{v:.4g}"),
    ("after", "after", lambda v: f"{v:.4g}"),
    ("dense", "dense", lambda v: f"{v:.4g}"),
    ("gap_recovered", "gap recovered", lambda v: f"{v:.1%}"),
    ("steps", "steps", str),
    ("restore_cpu_s", "training CPU s", _num(0)),
    ("sparsity_after_merge", "sparsity after merge", _num(6)),
    ("mask_preserved", "mask kept", _yes_no),
]
# Facts shared by the rows of a file, printed once under its table rather than in every row.
SHARED = ["protocol", "calibration", "evaluation", "cpu", "threads", "torch", "commit"]


def rows_of(value: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(rows, file-level facts): a list is all rows; an object holds its rows under "rows"."""
    if isinstance(value, list):
        return value, {}
    return list(value.get("rows", [])), {key: item for key, item in value.items() if key != "rows"}


def table(rows: list[dict[str, Any]]) -> str:
    columns = [column for column in COLUMNS if any(row.get(column[0]) is not None for row in rows)]
    lines = ["| " + " | ".join(header for _, header, _ in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        cells = [("" if row.get(key) is None else fmt(row[key])) for key, _, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def shared_facts(rows: list[dict[str, Any]], facts: dict[str, Any]) -> list[str]:
    """One line per fact; a fact that differs between rows is listed with all its values (a warning sign)."""
    lines = []
    for key in SHARED:
        values = {json.dumps(row[key], sort_keys=True) for row in rows if key in row}
        if key in facts:
            values.add(json.dumps(facts[key], sort_keys=True))
        if values:
            lines.append(f"- {key}: " + "; ".join(_plain(json.loads(value)) for value in sorted(values)))
    return lines


def _plain(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{key} {item}" for key, item in value.items())
    return str(value)


def summarise(path: Path) -> str:
    rows, facts = rows_of(json.loads(path.read_text()))
    return "\n".join([f"### {path.name}", "", table(rows), "", *shared_facts(rows, facts)])


# Published perplexities on LLaMA-7B (WikiText-2) at 70% unstructured sparsity with Wanda, as the papers report them:
# OWL (Yin et al., 2024), AlphaPruning (Lu et al., 2024), DLP (Chen et al., 2025). Another model and other text
# than ours: for the order of the allocations, not for their values.
PUBLISHED_LLAMA7B_WANDA_07 = {"uniform": 85.8, "owl": 24.6, "alphapruning": 23.9, "dlp": 20.5}
SIDE_BY_SIDE_ORDER = ("uniform", "owl", "alphapruning", "dlp", "ecoflap-first", "ecoflap-zeroth")


def _allocation_name(row: dict[str, Any]) -> str:
    variant = row.get("variant")
    return f"{row['allocation']} ({variant})" if variant else row["allocation"]


def side_by_side(rows: list[dict[str, Any]]) -> str:
    """Every allocation (rows) by method and target (columns): the perplexity, or over several seeds its mean and
    [min, max] with the number of seeds; the published LLaMA-7B figure with Wanda at 0.7 beside, labelled."""
    cells: dict[tuple[str, str, float], list[float]] = {}
    for row in rows:
        if row.get("allocation") is None or row.get("pattern", "unstructured") != "unstructured" \
                or row.get("perplexity") is None or row.get("method") not in ("wanda", "sparsegpt"):
            continue
        cells.setdefault((_allocation_name(row), row["method"], round(row["sparsity"], 2)), []).append(
            row["perplexity"])
    columns = sorted({(method, sparsity) for _, method, sparsity in cells}, key=lambda c: (c[0] != "wanda", c[1]))
    names = sorted({name for name, _, _ in cells},
                   key=lambda n: (SIDE_BY_SIDE_ORDER.index(n.split(" ")[0]) if n.split(" ")[0] in SIDE_BY_SIDE_ORDER
                                  else len(SIDE_BY_SIDE_ORDER), n))

    def cell(values: list[float] | None) -> str:
        if not values:
            return ""
        if len(values) == 1:
            return f"{values[0]:.2f}"
        return f"{sum(values) / len(values):.2f} [{min(values):.2f}, {max(values):.2f}] ({len(values)} seeds)"

    header = ["allocation", *(f"{'Wanda' if m == 'wanda' else 'SparseGPT'} {s:g}" for m, s in columns),
              "LLaMA-7B, Wanda 0.7 (published)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for name in names:
        published = PUBLISHED_LLAMA7B_WANDA_07.get(name)
        lines.append("| " + " | ".join([name, *(cell(cells.get((name, m, s))) for m, s in columns),
                                        "" if published is None else f"{published}"]) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*", type=Path, help="results files (default: bench/results/*.json)")
    parser.add_argument("--side-by-side", action="store_true",
                        help="one table of every allocation by method and target (quality-smollm2.json)")
    args = parser.parse_args()
    if args.side_by_side:
        path = args.files[0] if args.files else RESULTS_DIR / "quality-smollm2.json"
        print(side_by_side(rows_of(json.loads(path.read_text()))[0]))
        return 0
    files = args.files or sorted(RESULTS_DIR.glob("*.json"))
    print("\n\n".join(summarise(path) for path in files))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
