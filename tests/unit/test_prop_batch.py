"""Property-based tests of memora-batch (hypothesis; issue 17 item 8):

- sweep parsing: any integer an INT input takes and any text survive a CSV or YAML file (written by the standard
  writers) into exactly the value the job's graph sets, and the value recorded in results;
- the results store: any interleaving of runs killed after some jobs (cleanly, or mid-write of a record) and reruns
  ends with every job recorded exactly once, and no job run again once its record is complete."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from memora_batch import sweep as sw
from memora_batch.results import ResultsStore
from memora_batch.runner import plan_jobs, run_plan
from memora_batch.workflow import Workflow, title_of

from batch_kit import DEFINITIONS, Instant

ROOT = Path(__file__).resolve().parents[2]
SEED_MAX = 2 ** 64 - 1  # KSampler.seed's range (the widest INT input of the shipped workflows)
PROPS = settings(max_examples=150, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                         HealthCheck.too_slow])


@pytest.fixture(scope="module")
def workflow():
    wf = Workflow.load(ROOT / "example_workflows" / "recovery_sweep.json")
    wf.to_api(DEFINITIONS)
    return wf


def _value(job, title: str, name: str):
    (node,) = [n for nid, n in job.api.items() if title_of(job.api, nid) == title]
    return node["inputs"][name]


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


# Text a prompt may hold: anything but surrogates (not encodable) and the empty string (an empty CSV cell means
# "keep the workflow's value"); line breaks of every kind, quotes, commas, NUL, BOMs and non-BMP characters included.
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40)


@PROPS
@given(seed=st.integers(0, SEED_MAX), prompt=TEXT, fmt=st.sampled_from(["csv", "yaml"]))
@example(seed=9007199254740993, prompt="a photo of\u2028a\x85parachute\r\n\x0c", fmt="csv")
def test_any_integer_and_any_text_survive_a_sweep_file_into_the_job(workflow, tmp_path, seed, prompt, fmt):
    path = tmp_path / f"s.{fmt}"
    if fmt == "csv":
        _write_csv(path, ["Seed image 1a.seed", "Evaluation prompt.value"], [[seed, prompt]])
    else:
        text = yaml.safe_dump([{"Seed image 1a.seed": seed, "Evaluation prompt.value": prompt}], allow_unicode=True)
        # PyYAML's own writer does not round-trip every string (with allow_unicode it writes U+0085 raw in a quoted
        # scalar, which YAML folds to a space on reading): the property is that we run what the file says
        assume(yaml.safe_load(text)[0]["Evaluation prompt.value"] == prompt)
        path.write_text(text, encoding="utf-8")
    (job,) = plan_jobs(workflow, Instant(), sw.load_rows(path)).jobs
    assert _value(job, "Seed image 1a", "seed") == seed and type(_value(job, "Seed image 1a", "seed")) is int
    assert _value(job, "Evaluation prompt", "value") == prompt
    assert job.overrides == {"Seed image 1a.seed": seed, "Evaluation prompt.value": prompt}  # what results record


@PROPS
@given(value=st.integers(-(2 ** 63) + 1, 2 ** 63 - 1), prompt=TEXT)
def test_any_integer_and_text_survive_set(workflow, value, prompt):
    (job,) = plan_jobs(workflow, Instant(), overrides=sw.parse_set_texts(
        [f"Evaluation seed.value={value}", f"Evaluation prompt.value={prompt}"])).jobs
    assert _value(job, "Evaluation seed", "value") == value
    assert _value(job, "Evaluation prompt", "value") == prompt


# -- the results store under kills ----------------------------------------------------------------------------------
class Killed(Exception):
    pass


@PROPS
@given(n_jobs=st.integers(1, 6), kills=st.lists(st.tuples(st.integers(1, 6), st.booleans(), st.integers(1, 400)),
                                                 max_size=5))
def test_any_interleaving_of_kills_and_reruns_records_every_job_exactly_once(workflow, tmp_path_factory, n_jobs,
                                                                            kills):
    """Each run is killed once ``after`` records are written; with ``torn``, the kill came in the middle of writing
    the last of them: only its first ``cut`` bytes are on disk (kill -9). A final run goes to the end."""
    out = tmp_path_factory.mktemp("store")
    backend = Instant()
    plan = plan_jobs(workflow, backend, [{"Evaluation seed.value": i} for i in range(n_jobs)])
    reruns = 0
    for after, torn, cut in kills:
        seen = []

        def kill(record, after=after, torn=torn, cut=cut):
            seen.append(record)
            if len(seen) < after:
                return
            if torn:
                data = (out / "results.jsonl").read_bytes()
                start = data.rstrip(b"\n").rfind(b"\n") + 1
                line = data[start:].rstrip(b"\n")
                (out / "results.jsonl").write_bytes(data[:start] + line[:cut])
                nonlocal reruns
                reruns += cut < len(line)  # a record cut short was never written: its job runs again
            raise Killed

        try:
            run_plan(plan, backend, out, progress=False, on_record=kill)
        except Killed:
            pass
    summary = run_plan(plan, backend, out, progress=False)
    assert summary.failed == 0 and summary.not_run == 0
    records = [json.loads(x) for x in (out / "results.jsonl").read_text().split("\n") if x]  # whole records only
    assert sorted(r["key"] for r in records) == sorted(j.key for j in plan.jobs)  # every job exactly once
    assert len(ResultsStore(out).latest()) == n_jobs and ResultsStore(out).problems == []
    assert sum(backend.runs.values()) == n_jobs + reruns  # nothing finished ran again
