"""``memora-batch rescore RESULTS_DIR --convention NAME``: every rate of a finished run counted again under another
scoring convention, from the raw detections the score nodes stored, without running a model.

Each score node puts its score record (``memora.evaluation.conventions``: every image's raw detections or top-k
classes) into its summary table, and memora-batch keeps the tables in results.jsonl. Rescoring applies the named
convention to each record, rewrites the table's rate cells (rate, k, n, Wilson interval, convention) and the
matching results columns (``<node>.rate``, ``.k``, ``.n``, ``.ci_low``, ``.ci_high``, ``.convention``), and writes

- ``results.<convention>.jsonl`` and ``results.<convention>.csv`` (the run's own results.jsonl / results.csv are
  never touched; rescoring again under the same convention replaces these two),
- ``asr.<convention>.csv``: the attack success rate over the prompt set under the new convention.

Scores whose kind the convention does not apply to (e.g. the micro world detector's under a NudeNet convention)
keep their original numbers and convention, and are listed; so are means (the CLIP score: its record has no
``"schema"``, there is no counting convention to change)."""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path

from memora.contracts import UI_SCORES
from memora.evaluation import conventions

from . import sweep as _sweep
from .folder import ResultsFolder
from .results import ResultsStore, metrics_from_ui, write_snapshot


class RescoreError(ValueError):
    """The results folder cannot be rescored as asked (no folder, no stored detections, no applicable score)."""


@dataclass
class Rescored:
    records: list[dict]
    rescored: list[str] = field(default_factory=list)  # "<job key> <node>" of every table counted again
    skipped: dict[str, str] = field(default_factory=dict)  # node -> why it kept its numbers


def file_stem(convention_name: str) -> str:
    """'custom:threshold=0.5,classes=A,B' -> 'custom-threshold-0.5-classes-A-B' (a file-name-safe name)."""
    return re.sub(r"[^A-Za-z0-9._]+", "-", convention_name).strip("-")


def rescore_table(table: dict, conv: conventions.Convention) -> dict:
    """A copy of one stored score table counted under ``conv``: its record and its rate cells."""
    rec = conventions.rescore(table["record"], conv)
    out = {**table, "record": rec}
    cells = dict(zip(conventions.RATE_COLUMNS, conventions.rate_row(rec["rate"])))
    if conv.is_nudenet:
        cells["threshold"] = conv.threshold
    cols = list(table.get("columns") or [])
    rows = [list(r) for r in table.get("rows") or []]
    if rows:
        rows[0] = [cells.get(c, v) for c, v in zip(cols, rows[0])]
    out["rows"] = rows
    return out


def _nudenet_tables(record: dict, conv: conventions.Convention, title: str) -> list[dict]:
    """The NudeNet node's tables exactly as a fresh run under ``conv`` would publish them."""
    from memora.evaluation import nudity

    tables = nudity.score_convention([img["detections"] for img in record["images"]], conv).tables()
    tables[0]["record"]["detector"] = record.get("detector", tables[0]["record"]["detector"])
    return tables


def _classifier_tables(record: dict, conv: conventions.Convention, title: str) -> list[dict]:
    """The object / style-classifier node's tables (summary, conventions, images) from the rescored record."""
    from memora.evaluation import objects

    return objects.tables(title, conventions.rescore(record, conv))


def _zero_shot_tables(record: dict, conv: conventions.Convention, title: str) -> list[dict]:
    from memora.evaluation import clip_score

    return clip_score.style_tables(conventions.rescore(record, conv))


#: score kinds whose node tables are rebuilt whole (per-image, per-class and per-convention tables too), from the
#: record and the summary table's title, with the per-image keys those tables read; other records get their summary
#: table's rate cells and record replaced (rescore_table)
TABLE_BUILDERS = {conventions.NUDENET: (_nudenet_tables, ()),
                  "imagenet": (_classifier_tables, ("topk_names", "target_rank")),
                  "style-classifier": (_classifier_tables, ("topk_names", "target_rank")),
                  "clip-zeroshot": (_zero_shot_tables, ("cosines",))}


def _builder(record: dict):
    """The function that rebuilds the node's tables from ``record``, or None (rescore the summary cells only) when
    its kind has none or the record lacks what the node's tables show (a record written by other code)."""
    build, keys = TABLE_BUILDERS.get(record.get("kind"), (None, ()))
    if build is _classifier_tables and not isinstance(record.get("rates"), dict):
        return None
    if build is None or not all(all(k in img for k in keys) for img in record.get("images") or []):
        return None
    return build


def _rescore_node(r: dict, node: str, idx: list[int], conv: conventions.Convention) -> None:
    """Replace one node's tables in job record ``r`` (in place) and its results columns."""
    tables = r["tables"]
    first = tables[idx[0]]
    build = _builder(first["record"])
    if build is None:
        new = [rescore_table(first, conv)] + [tables[i] for i in idx[1:]]
    else:
        new = build(first["record"], conv, first.get("title", ""))
    r["tables"] = [t for i, t in enumerate(tables) if i not in idx[1:]]
    pos = r["tables"].index(first)
    r["tables"][pos:pos + 1] = [{"node": node, **{k: v for k, v in t.items() if k != "node"}} for t in new]
    fresh = metrics_from_ui({"n": {UI_SCORES: [{k: v for k, v in t.items() if k != "node"} for t in new]}},
                            {"n": node})
    metrics: dict = {}
    for k, v in (r.get("metrics") or {}).items():  # the node's columns where they were, the others unchanged
        if k.startswith(node + "."):
            metrics.update(fresh)
        else:
            metrics[k] = v
    r["metrics"] = {**metrics, **fresh}


def _shared_title(r: dict, node: str, idx: list[int]) -> str:
    """The refusal for a job whose score records share one node title (tables are stored by title, not node id)."""
    kinds = ", ".join(str(r["tables"][i]["record"].get("kind")) for i in idx)
    return (f"job {r.get('key')}: {len(idx)} score nodes share the title {node!r} ({kinds} records): results.jsonl "
            f"keeps tables by node title, so their tables and results columns cannot be told apart and rescoring "
            f"would drop all but one. Give each score node its own title in the workflow and run it again")


def rescore_records(records: list[dict], conv: conventions.Convention) -> Rescored:
    """Every ok job's stored score tables counted again under ``conv`` (copies; failed jobs unchanged); RescoreError
    when two score nodes of a job share a title."""
    result = Rescored([])
    for r in records:
        r = copy.deepcopy(r)
        result.records.append(r)
        if r.get("status") != "ok":
            continue
        by_node: dict[str, list[int]] = {}
        for i, table in enumerate(r.get("tables") or []):
            if isinstance(table, dict):
                by_node.setdefault(table.get("node", "?"), []).append(i)
        for node, idx in by_node.items():
            with_record = [i for i in idx if conventions.is_score_record(r["tables"][i].get("record"))]
            if not with_record:
                means = [r["tables"][i]["record"] for i in idx if isinstance(r["tables"][i].get("record"), dict)]
                if means:  # e.g. the CLIP score: a mean has no counting convention
                    result.skipped[node] = (f"{means[0].get('kind', 'a mean')} under "
                                            f"{means[0].get('convention', '?')}: a mean, nothing to rescore")
                continue
            if len(with_record) > 1:
                raise RescoreError(_shared_title(r, node, with_record))
            rec = r["tables"][with_record[0]]["record"]
            kind = conventions.check_record(rec)
            if not conv.applies_to(kind):
                result.skipped[node] = (f"{kind} scores ({', '.join(conventions.names_for(kind))} apply); kept "
                                        f"under {rec.get('convention')}")
                continue
            first = r["tables"][with_record[0]]
            if _builder(rec) is None and len(first.get("rows") or []) != 1:
                result.skipped[node] = (f"its score record sits in a table of {len(first.get('rows') or [])} rows; "
                                        f"only a one-row summary table can be rescored cell by cell")
                continue
            _rescore_node(r, node, with_record + [i for i in idx if i not in with_record], conv)
            result.rescored.append(f"{r['key']} {node}")
        r["rescored"] = {"convention": conv.name, "rule": conv.rule, "from": "results.jsonl"}
    return result


def _load(results_dir: Path) -> list[dict]:
    if not results_dir.is_dir():
        raise RescoreError(f"results folder not found: {results_dir}")
    if not (results_dir / "results.jsonl").is_file():
        raise RescoreError(f"{results_dir} has no results.jsonl: not a memora-batch results folder (give the --out "
                           f"folder of a memora-batch run)")
    return ResultsStore(results_dir).latest()


def rescore_folder(results_dir: "str | Path", convention: str, force: bool = False) -> tuple[Rescored, list[Path]]:
    """Rescore a results folder (under its lock); returns what was done and the files written."""
    conv = conventions.get(convention)  # an unknown name fails before anything is read
    results_dir = Path(results_dir)
    records = _load(results_dir)
    stored = [t for r in records if r.get("status") == "ok" for t in r.get("tables") or []
              if isinstance(t, dict) and conventions.is_score_record(t.get("record"))]
    if not stored:
        raise RescoreError(f"{results_dir}/results.jsonl holds no stored detections: none of its score tables "
                           f"carries a score record (the run predates them, or its score nodes store none; means "
                           f"such as the CLIP score have no counting convention). Rescoring needs the raw "
                           f"detections: run the workflow again with this version of the pack")
    stem = file_stem(conv.name)
    written = (f"results.{stem}.jsonl", f"results.{stem}.csv", f"asr.{stem}.csv")
    # foreign files of these names need --force; the run's own derived files (report.html, ...) are not rescore's
    with ResultsFolder(results_dir, force=force, derived=written, run_files=False):
        result = rescore_records(records, conv)
        if not result.rescored:
            kinds = sorted({t["record"].get("kind") for t in stored})
            apply = sorted({n for k in kinds for n in conventions.names_for(k)})
            raise RescoreError(f"convention {conv.name!r} ({conv.rule}) applies to none of the stored scores: they "
                               f"are {', '.join(map(str, kinds))} scores; conventions for them: {', '.join(apply)}")
        jsonl, table = write_snapshot(results_dir, f"results.{stem}", result.records)
        asr = _sweep.write_asr(results_dir, _sweep.attack_success(result.records), written[2])
    return result, [jsonl, table, asr]
