"""The results of a batch: one record per job in results.jsonl (appended and flushed as each job ends) and the same
table as results.csv (rewritten atomically after each job, so both survive Ctrl-C intact).

A record: ``key`` (hash of the job's resolved graph), ``status`` (ok / error), ``row`` (index in the sweep),
``overrides`` (address -> value), ``labels``, ``outputs`` (files, LoRAs), ``metrics`` (score tables and training loss
read from the nodes' UI outputs), ``started``, ``seconds``, ``server``, ``prompt_id``, ``error``.
A rerun skips the keys recorded with status ok; failed jobs run again (their new record is appended; the CSV shows
the latest record of each key)."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Optional

from memora.contracts import UI_LORA, UI_LOSS, UI_SCORES
from memora.fileio import atomic_write

FIXED_COLUMNS = ["key", "status", "row"]
TAIL_COLUMNS = ["outputs", "loras", "seconds", "started", "server", "retries", "prompt_id", "error"]
#: the one text cell of a score table kept as a results column (the score-table contract): the convention a rate
#: was counted by, written next to the rate
TEXT_COLUMN = "convention"


class ResultsError(ValueError):
    """results.jsonl is not a memora-batch results file (a line that is JSON but no job record)."""


class ResultsStore:
    """results.jsonl read back: one record per finished job. A last line cut short (the process was killed while
    writing it) is reported in :attr:`problems` and cut off before the next record is appended (the fragment is
    kept in ``results.jsonl.torn``), so it can never swallow the next record; its job, never recorded as finished,
    runs again. A line that holds two records glued by an older version's torn write gives back the second."""

    def __init__(self, directory: "str | Path"):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = self.dir / "results.jsonl"
        self.csv = self.dir / "results.csv"
        self.records: list[dict] = []
        self.problems: list[str] = []
        self._torn: Optional[tuple[int, bytes]] = None  # (offset of the torn tail, its bytes)
        if self.jsonl.exists():
            self._load(self.jsonl.read_bytes())

    def _load(self, data: bytes) -> None:
        complete = data.rfind(b"\n") + 1
        tail = data[complete:]
        for n, raw in enumerate(data[:complete].split(b"\n")[:-1], start=1):
            line = raw.decode("utf-8", errors="replace").strip()
            if line:
                self._load_line(line, n)
        if tail.strip():
            rec = _parse_record(tail.decode("utf-8", errors="replace"))
            if rec is not None:  # complete but for its newline
                self.records.append(rec)
            what = f"job {rec['key']} kept" if rec else "that job was not recorded and runs again"
            self.problems.append(f"{self.jsonl}: the last line was cut short (a run killed while writing it): "
                                 f"{tail[:80].decode('utf-8', errors='replace')!r}...; {what}; the line is "
                                 f"{'completed' if rec else 'moved to results.jsonl.torn'} before the next record")
            self._torn = (complete, tail if rec is None else b"")

    def _load_line(self, line: str, n: int) -> None:
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            rec = _parse_record(line[line.rfind('{"key": '):]) if '{"key": ' in line else None
            self.problems.append(f"{self.jsonl} line {n} is not valid JSON (a torn write)"
                                 + (f"; the job record at its end ({rec['key']}) is kept" if rec else ""))
            if rec is not None:
                self.records.append(rec)
            return
        if not _is_record(obj):
            raise ResultsError(f"{self.jsonl} line {n} is not a memora-batch job record (expected an object with "
                               f"'key' and 'status'): not a memora-batch results file; choose another --out")
        self.records.append(obj)

    def repair(self) -> None:
        """Cut a torn last line off results.jsonl (kept in results.jsonl.torn) or complete it with its newline."""
        if self._torn is None:
            return
        offset, fragment = self._torn
        if fragment:
            with open(self.dir / "results.jsonl.torn", "ab") as f:
                f.write(fragment + b"\n")
                f.flush()
                os.fsync(f.fileno())
            os.truncate(self.jsonl, offset)
        else:
            with open(self.jsonl, "ab") as f:
                f.write(b"\n")
                f.flush()
                os.fsync(f.fileno())
        self._torn = None

    def finished_keys(self) -> set[str]:
        return {r["key"] for r in self.records if r.get("status") == "ok"}

    def latest(self) -> list[dict]:
        by_key: dict[str, dict] = {}
        for r in self.records:
            by_key.pop(r["key"], None)
            by_key[r["key"]] = r
        return sorted(by_key.values(), key=lambda r: (r.get("row") is None, r.get("row") or 0))

    def append(self, record: dict) -> None:
        self.repair()
        line = json.dumps(record, default=str, allow_nan=False, sort_keys=False) if _finite(record) else \
            json.dumps(_nan_to_none(record), default=str)
        with open(self.jsonl, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records.append(json.loads(line))
        self.write_csv()

    def write_csv(self) -> None:
        atomic_write(self.csv, csv_text(self.latest()), replace=True)


def csv_text(rows: list[dict]) -> str:
    """results.csv's text for these records (one row each)."""
    override_cols, label_cols, metric_cols = [], [], []
    for r in rows:
        for k in r.get("overrides", {}):
            if k not in override_cols:
                override_cols.append(k)
        for k in r.get("labels", {}):
            if f"label.{k}" not in label_cols:
                label_cols.append(f"label.{k}")
        for k in r.get("metrics", {}):
            if k not in metric_cols:
                metric_cols.append(k)
    header = FIXED_COLUMNS + override_cols + label_cols + metric_cols + TAIL_COLUMNS
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    for r in rows:
        outputs = r.get("outputs", {})
        cells = [r.get("key"), r.get("status"), r.get("row")]
        cells += [_exact(r.get("overrides", {}).get(k)) for k in override_cols]
        cells += [_exact(r.get("labels", {}).get(k[len("label."):])) for k in label_cols]
        cells += [_cell(r.get("metrics", {}).get(k)) for k in metric_cols]
        cells += [";".join(outputs.get("files", [])), ";".join(outputs.get("loras", [])),
                  _cell(r.get("seconds")), r.get("started"), r.get("server"), len(r.get("retries") or []),
                  r.get("prompt_id"),
                  r.get("error") or ""]
        w.writerow(cells)
    return buf.getvalue()


def write_snapshot(directory: "str | Path", stem: str, records: list[dict]) -> tuple[Path, Path]:
    """Write ``records`` as <stem>.jsonl and <stem>.csv (each atomically, replacing an earlier snapshot of that
    name): derived results such as a rescoring, never results.jsonl / results.csv themselves."""
    if stem == "results":
        raise ValueError("a snapshot never replaces the run's own results.jsonl / results.csv")
    directory = Path(directory)
    lines = [json.dumps(r if _finite(r) else _nan_to_none(r), default=str, allow_nan=False) for r in records]
    jsonl, table = directory / f"{stem}.jsonl", directory / f"{stem}.csv"
    atomic_write(jsonl, "".join(line + "\n" for line in lines), replace=True)
    atomic_write(table, csv_text(records), replace=True)
    return jsonl, table


def _is_record(obj: Any) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get("key"), str) and "status" in obj


def _parse_record(text: str) -> Optional[dict]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return None
    return obj if _is_record(obj) else None


def _exact(v: Any) -> Any:
    """A results.csv cell holding exactly the value that ran (floats as their shortest exact repr)."""
    if isinstance(v, float):
        return repr(v)
    return _cell(v)


def _cell(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return v


def _finite(obj: Any) -> bool:
    if isinstance(obj, float):
        return math.isfinite(obj)
    if isinstance(obj, dict):
        return all(_finite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(_finite(v) for v in obj)
    return True


def _nan_to_none(obj: Any) -> Any:
    """JSON has no NaN/inf: write them as strings ("inf" for an identical image's PSNR, for instance)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    return obj


def metrics_from_ui(ui_outputs: dict, titles: dict[str, str]) -> dict[str, Any]:
    """Numbers the nodes report in their UI output, flattened to ``<node title>.<name>`` columns.

    - ``memora_scores`` tables ({title, columns, rows}): a one-row table (a node's summary) gives
      ``<node>.<column>`` for each numeric cell and for the text ``convention`` cell; a table whose rows are named by a text first cell (a detector's
      concepts) gives ``<node>.<row name>.<column>``. Other multi-row tables (per-image details) stay in the JSONL
      record (``tables``); only a node that reports none of the above gets ``<node>.<column>.mean`` from them.
    - ``memora_loss`` (training): ``<node>.final_loss`` and ``<node>.train_steps``.
    """
    metrics: dict[str, Any] = {}
    for nid, ui in (ui_outputs or {}).items():
        if not isinstance(ui, dict):
            continue
        name = titles.get(str(nid), str(nid))
        tables = [t for t in ui.get(UI_SCORES) or [] if isinstance(t, dict) and t.get("columns")]
        single = [t for t in tables if len(t.get("rows") or []) == 1]
        for table in single:
            for c, v in zip(table["columns"], table["rows"][0]):
                if _kept(c, v):
                    metrics.setdefault(f"{name}.{c}", v)
        for table in tables:
            rows = [r for r in table.get("rows") or [] if isinstance(r, (list, tuple)) and r]
            labels = [r[0] for r in rows]
            if len(rows) > 1 and all(isinstance(x, str) for x in labels) and len(set(labels)) == len(labels):
                # one row per named item (e.g. a detector's concepts): <node>.<item>.<column>
                for r in rows:
                    for c, v in zip(table["columns"][1:], r[1:]):
                        if _kept(c, v):
                            metrics.setdefault(f"{name}.{r[0]}.{c}", v)
                single.append(table)
        if not single:
            for table in tables:
                rows = [r for r in table.get("rows") or [] if isinstance(r, (list, tuple))]
                for j, c in enumerate(table["columns"]):
                    vals = [float(r[j]) for r in rows if j < len(r) and _is_number(r[j])]
                    finite = [v for v in vals if math.isfinite(v)]
                    if rows and len(vals) == len(rows) and finite:
                        metrics.setdefault(f"{name}.{c}.mean", sum(finite) / len(finite))
        loss = ui.get(UI_LOSS)
        if isinstance(loss, list) and loss and isinstance(loss[-1], dict) and "loss" in loss[-1]:
            metrics[f"{name}.final_loss"] = loss[-1]["loss"]
            metrics[f"{name}.train_steps"] = loss[-1].get("step", len(loss))
    return metrics


def tables_from_ui(ui_outputs: dict, titles: dict[str, str]) -> list[dict]:
    out = []
    for nid, ui in (ui_outputs or {}).items():
        for table in (ui or {}).get(UI_SCORES) or [] if isinstance(ui, dict) else []:
            if isinstance(table, dict):
                out.append({"node": titles.get(str(nid), str(nid)), **table})
    return out


def _kept(column: str, v: Any) -> bool:
    """A cell that becomes a results column: a number, or the text naming the convention a rate was counted by."""
    return _is_number(v) or (column == TEXT_COLUMN and isinstance(v, str))


def _is_number(v: Any) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, (int, float)):
        return True
    return False


def files_from_ui(ui_outputs: dict, resolve: Optional[callable] = None) -> tuple[list[str], list[str]]:
    """(output files, saved LoRA names) listed in the UI outputs (images, gifs, audio, ... and ``memora_lora``)."""
    files, loras = [], []
    for ui in (ui_outputs or {}).values():
        if not isinstance(ui, dict):
            continue
        for key, items in ui.items():
            if key == UI_LORA:
                loras.extend(str(x) for x in items or [])
                continue
            for item in items or [] if isinstance(items, list) else []:
                if isinstance(item, dict) and "filename" in item and item.get("type", "output") == "output":
                    files.append(resolve(item) if resolve else "/".join(p for p in (item.get("subfolder"),
                                                                                       item["filename"]) if p))
    return files, loras
