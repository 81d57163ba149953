"""Sweep files: which inputs each job sets.

A sweep is a table: one row per job, one column per input, addressed as ``<node title or id>.<input name>``
(``Train LoRA.steps``, ``12.seed``; a title shared by several nodes sets all of them). Files:

- CSV: a header row of addresses, one row per job.
- JSON / YAML: a list of rows (``[{"Train LoRA.steps": 10}, ...]``), or a mapping with ``rows`` and/or ``grid``
  (``grid: {"Train LoRA.steps": [10, 50], "Seed.value": [1, 2]}`` = every combination; with ``rows`` too, every row
  is combined with every grid point).

Columns named ``label.<anything>`` set nothing: they are copied to the results (tags for your own bookkeeping).

**The field's prompt CSVs** (UnlearnDiffAtk, MemoRa: columns ``prompt``, ``evaluation_seed``, ``evaluation_guidance``
and often case_number, categories, ...) are accepted as they are. Their three columns map by title
(:data:`PROMPT_CSV_CONVENTION`): ``prompt`` -> the node titled "Evaluation prompt", ``evaluation_seed`` -> "Evaluation
seed", ``evaluation_guidance`` -> "Evaluation guidance" (each node's value, text, seed or cfg input), falling back to the
seed / cfg of nodes titled "Evaluation sampler". Their other columns are kept as labels.
"""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path
from typing import Any, Optional

from memora.contracts import (TITLE_EVALUATION_GUIDANCE, TITLE_EVALUATION_PROMPT, TITLE_EVALUATION_SAMPLER,
                              TITLE_EVALUATION_SEED)

from .workflow import AddressError, resolve_address

#: column -> [(node title, [input names tried in order]), ...]
PROMPT_CSV_CONVENTION: dict[str, list[tuple[str, list[str]]]] = {
    "prompt": [(TITLE_EVALUATION_PROMPT, ["text", "value", "prompt", "string"])],
    "evaluation_seed": [(TITLE_EVALUATION_SEED, ["value", "seed", "noise_seed"]),
                        (TITLE_EVALUATION_SAMPLER, ["seed", "noise_seed"])],
    "evaluation_guidance": [(TITLE_EVALUATION_GUIDANCE, ["value", "cfg"]),
                            (TITLE_EVALUATION_SAMPLER, ["cfg"])],
}
LABEL_PREFIX = "label."


class SweepError(ValueError):
    """The sweep file cannot be read or one of its columns addresses nothing."""


def load_rows(path: "str | Path") -> list[dict[str, Any]]:
    """The rows of a sweep file (values as written: strings from CSV, typed from JSON/YAML)."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file not found: {path}")
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8-sig")
    if suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        if not reader.fieldnames:
            raise SweepError(f"{path}: empty CSV (expected a header row of '<node title>.<input>' columns)")
        rows = []
        for i, row in enumerate(reader, start=2):
            if None in row:
                raise SweepError(f"{path} line {i}: more cells than header columns")
            rows.append({k.strip(): v for k, v in row.items() if k is not None and k.strip()})
        return rows
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise SweepError(f"{path} is not valid JSON: {e}") from None
    elif suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise SweepError(f"{path} is not valid YAML: {e}") from None
    else:
        raise SweepError(f"{path}: unknown sweep file type {suffix!r} (expected .csv, .json, .yaml or .yml)")
    return rows_from_data(data, str(path))


def rows_from_data(data: Any, where: str = "sweep") -> list[dict[str, Any]]:
    if isinstance(data, list):
        rows, grid = data, None
    elif isinstance(data, dict) and ("rows" in data or "grid" in data):
        unknown = set(data) - {"rows", "grid"}
        if unknown:
            raise SweepError(f"{where}: unknown top-level keys {sorted(unknown)} (expected 'rows' and/or 'grid')")
        rows, grid = data.get("rows") or [{}], data.get("grid")
    elif isinstance(data, dict):
        rows, grid = [data], None
    else:
        raise SweepError(f"{where}: expected a list of rows or a mapping with 'rows'/'grid', got {type(data).__name__}")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise SweepError(f"{where}: row {i} is {type(row).__name__}, expected a mapping of address -> value")
    if grid is None:
        return [dict(r) for r in rows]
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise SweepError(f"{where}: 'grid' must map each address to a non-empty list of values")
    keys = list(grid)
    points = [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]
    return [{**r, **p} for r in rows for p in points]


def is_prompt_csv(columns: list[str]) -> bool:
    return "prompt" in columns


def plan_columns(columns: list[str], api: dict, object_info: dict, aliases: Optional[dict] = None) -> dict[str, Optional[str]]:
    """column -> the address it sets (None: a label). Raises SweepError naming every column that addresses nothing."""
    prompt_csv = is_prompt_csv(columns)
    plan: dict[str, Optional[str]] = {}
    problems = []
    for col in columns:
        if col.startswith(LABEL_PREFIX):
            plan[col] = None
            continue
        if prompt_csv and col in PROMPT_CSV_CONVENTION:
            address = _convention_address(col, api, object_info, aliases)
            if address is None:
                wanted = " or ".join(f"a node titled {t!r} (input {'/'.join(ins)})"
                                     for t, ins in PROMPT_CSV_CONVENTION[col])
                problems.append(f"column {col!r} (prompt CSV convention) needs {wanted}; the workflow has none")
            plan[col] = address
            continue
        if prompt_csv and "." not in col:
            plan[col] = None  # case_number, categories, ...: bookkeeping columns of the field's prompt sets
            continue
        try:
            resolve_address(col, api, object_info, aliases)
        except AddressError as e:
            problems.append(f"column {e}")
            continue
        plan[col] = col
    if problems:
        raise SweepError("the sweep cannot be applied to this workflow:\n  " + "\n  ".join(problems))
    return plan


def _convention_address(col: str, api: dict, object_info: dict, aliases: Optional[dict]) -> Optional[str]:
    for title, inputs in PROMPT_CSV_CONVENTION[col]:
        for inp in inputs:
            try:
                resolve_address(f"{title}.{inp}", api, object_info, aliases)
            except AddressError:
                continue
            return f"{title}.{inp}"
    return None


def row_overrides(row: dict[str, Any], plan: dict[str, Optional[str]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(address -> value, label -> value) for one row; empty CSV cells leave the workflow's value."""
    overrides, labels = {}, {}
    for col, value in row.items():
        address = plan.get(col)
        if address is None:
            labels[col[len(LABEL_PREFIX):] if col.startswith(LABEL_PREFIX) else col] = value
        elif value is not None and value != "":
            overrides[address] = value
    return overrides, labels


def parse_assignments(items: list[str]) -> dict[str, Any]:
    """``--set "Train LoRA.steps=100"`` items -> {address: value} (value parsed as YAML scalars: 100, 0.5, true)."""
    import yaml

    out = {}
    for item in items or []:
        if "=" not in item:
            raise SweepError(f"--set {item!r}: expected '<node title or id>.<input>=<value>'")
        key, value = item.split("=", 1)
        try:
            parsed = yaml.safe_load(value) if value.strip() else value
        except yaml.YAMLError:
            parsed = value
        out[key.strip()] = parsed if isinstance(parsed, (int, float, bool, str)) else value
    return out
