"""memora-batch runs what the user wrote, and refuses before the first job what cannot run (issue 17, items 3, 4
and 6): exact integers, text kept as written (line breaks of every kind in CSV cells, YAML words), non-finite numbers
refused, malformed sweeps, server URLs, broken workflow graphs and save prefixes outside the output folder named in
one error. Planned against the stored node definitions (tests/unit/batch_object_info.json), on real files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from memora_batch import cli
from memora_batch import sweep as sw
from memora_batch.results import ResultsStore
from memora_batch import runner
from memora_batch.runner import PlanError, plan_jobs
from memora_batch.workflow import Workflow, title_of

from batch_kit import DEFINITIONS, StoredDefinitions

ROOT = Path(__file__).resolve().parents[2]
BIG = 9007199254740993  # 2**53 + 1: the first integer a float cannot hold


@pytest.fixture(scope="module")
def workflow():
    wf = Workflow.load(ROOT / "example_workflows" / "recovery_sweep.json")
    wf.to_api(DEFINITIONS)  # converted once (comfy-cli's converter), reused by every plan
    return wf


def _value(job, title: str, name: str):
    (node,) = [n for nid, n in job.api.items() if title_of(job.api, nid) == title]
    return node["inputs"][name]


def _plan_file(workflow, tmp_path, name: str, text: str, **kw):
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8"))
    return plan_jobs(workflow, StoredDefinitions(), sw.load_rows(path), **kw)


# -- item 4: exact integers, exact text -------------------------------------------------------------------------------
def test_integers_above_2_53_run_exactly_from_csv_yaml_json_and_set(workflow, tmp_path):
    for name, text in (("s.csv", f"Seed image 1a.seed\n{BIG}\n"), ("s.yaml", f"- Seed image 1a.seed: {BIG}\n"),
                       ("s.json", json.dumps([{"Seed image 1a.seed": BIG}])),
                       ("e.csv", f"Seed image 1a.seed\n{BIG}.0\n")):
        (job,) = _plan_file(workflow, tmp_path, name, text).jobs
        assert _value(job, "Seed image 1a", "seed") == BIG, name
        assert job.overrides["Seed image 1a.seed"] == BIG, name
    (job,) = plan_jobs(workflow, StoredDefinitions(), overrides=sw.parse_set_texts([f"Evaluation seed.value={BIG}"])).jobs
    assert _value(job, "Evaluation seed", "value") == BIG
    # the record of what ran holds the same integer, in results.jsonl and results.csv
    store = ResultsStore(tmp_path / "r")
    store.append({"key": job.key, "status": "ok", "row": None, "overrides": job.overrides})
    assert json.loads((tmp_path / "r" / "results.jsonl").read_text())["overrides"]["Evaluation seed.value"] == BIG
    with open(tmp_path / "r" / "results.csv", newline="") as f:
        assert next(csv.DictReader(f))["Evaluation seed.value"] == str(BIG)


def test_line_breaks_inside_quoted_csv_prompts_are_kept(workflow, tmp_path):
    prompts = ["a photo of\na parachute", "a photo of\r\na church", "a photo of\ra dog", "a photo of\u2028a cat",
               "a photo of\x0ca tench", "tabs\tand \"quotes\", commas"]
    path = tmp_path / "p.csv"
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "case_number"])
        w.writerows([p, i] for i, p in enumerate(prompts))
    plan = plan_jobs(workflow, StoredDefinitions(), sw.load_rows(path))
    assert [_value(j, "Evaluation prompt", "value") for j in plan.jobs] == prompts
    assert [j.labels["case_number"] for j in plan.jobs] == [str(i) for i in range(len(prompts))]


def test_yaml_and_set_words_stay_text_for_text_inputs(workflow, tmp_path):
    plan = _plan_file(workflow, tmp_path, "w.yaml", "- Evaluation prompt.value: yes\n"
                                                    "- Evaluation prompt.value: 1e3\n"
                                                    "- Evaluation prompt.value: 0123\n")
    assert [_value(j, "Evaluation prompt", "value") for j in plan.jobs] == ["yes", "1e3", "0123"]
    (job,) = plan_jobs(workflow, StoredDefinitions(), overrides=sw.parse_set_texts(
        ["Evaluation prompt.value=on", "Train LoRA.steps=1_000", "Evaluation guidance.value=7.25"])).jobs
    assert _value(job, "Evaluation prompt", "value") == "on"
    assert _value(job, "Train LoRA", "steps") == 1000
    assert _value(job, "Evaluation guidance", "value") == 7.25


def test_results_csv_holds_the_exact_float_that_ran(tmp_path):
    lr = 1.234567891e-05
    store = ResultsStore(tmp_path)
    store.append({"key": "k", "status": "ok", "row": 0, "overrides": {"Train LoRA.learning_rate": lr},
                  "metrics": {"A.ssim": 0.123456789}})
    with open(tmp_path / "results.csv", newline="") as f:
        row = next(csv.DictReader(f))
    assert float(row["Train LoRA.learning_rate"]) == lr  # not 1.23457e-05
    assert row["A.ssim"] == "0.123457"  # metrics stay rounded for reading


# -- item 3: non-finite numbers ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("cell", ["nan", "NaN", "inf", "-Infinity", "1e400"])
def test_non_finite_float_is_refused_before_any_job(workflow, tmp_path, cell):
    with pytest.raises(PlanError) as e:
        _plan_file(workflow, tmp_path, "f.csv", f"Evaluation guidance.value,Train LoRA.learning_rate\n{cell},{cell}\n")
    text = str(e.value)
    assert f"Evaluation guidance.value: '{cell}' is not a valid FLOAT (expected a finite number)" in text
    assert f"Train LoRA.learning_rate: '{cell}' is not a valid FLOAT" in text


def test_json_nan_literal_is_refused(workflow, tmp_path):
    with pytest.raises(PlanError, match="is not a valid FLOAT"):
        _plan_file(workflow, tmp_path, "n.json", '[{"Evaluation guidance.value": NaN}]')


# -- item 6: every bad input before the first job, with a message -------------------------------------------------------
@pytest.mark.parametrize("cell", ["inf", "nan", "-inf", "1e999", "2.5", "seven"])
def test_non_integer_in_an_integer_column_is_a_message_not_a_traceback(workflow, tmp_path, cell):
    with pytest.raises(PlanError, match=f"Train LoRA.steps: '{cell}' is not a valid INT \\(expected an integer\\)"):
        _plan_file(workflow, tmp_path, "i.csv", f"Train LoRA.steps\n{cell}\n")


@pytest.mark.parametrize("data, message", [
    ({"rows": 5}, "'rows' is int (5), expected a list of mappings"),
    ({"rows": "abc"}, "'rows' is str"),
    ({"rows": [{"A.x": [1, 2]}]}, "expected '<node title>.<input>' addresses with single values"),
    ({"grid": {"A.x": 3}}, "'grid' must map each address to a non-empty list"),
    ([1, 2], "row 0 is int"),
])
def test_malformed_sweep_structure_is_a_sweep_error(tmp_path, data, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(sw.SweepError, match=message.replace("(", "\\(").replace(")", "\\)").replace("[", "\\[")):
        sw.load_rows(path)


def test_server_that_is_not_a_url_is_a_message(tmp_path, capsys):
    wf = ROOT / "example_workflows" / "recovery_sweep.json"
    for bad in ("not a url", "ftp://host:1", "http://host:99999"):
        assert cli.main(["run", str(wf), "--server", bad, "--out", str(tmp_path / "o")]) == cli.EXIT_BAD_INPUT
        err = capsys.readouterr().err
        assert f"--server {bad!r} is not a server URL" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_timeout_must_be_a_positive_finite_number(tmp_path, capsys):
    wf = ROOT / "example_workflows" / "recovery_sweep.json"
    for bad in ("nan", "inf", "0", "-3"):
        with pytest.raises(SystemExit) as e:
            cli.main(["run", str(wf), "--timeout", bad])
        assert e.value.code == 2
        assert "expected a positive number of seconds" in capsys.readouterr().err


def test_broken_workflow_structure_is_refused_before_any_job(workflow):
    api = json.loads(json.dumps(workflow.api))
    train = next(nid for nid in api if title_of(api, nid) == "Train LoRA")
    src = next(nid for nid, n in api.items() if n["class_type"] == "KSampler")
    api[train]["inputs"]["steps"] = 0  # out of range in the workflow itself
    api[src]["inputs"]["model"] = ["999", 0]  # a link to a node that is not there
    api[src]["inputs"].pop("positive")  # a required input missing
    vae = next(nid for nid, n in api.items() if n["class_type"] == "VAEDecode")
    api[vae]["inputs"]["samples"] = [src, 5]  # KSampler has one output
    with pytest.raises(PlanError) as e:
        plan_jobs(Workflow.load(api), StoredDefinitions(), [{"Evaluation seed.value": 1}, {"Evaluation seed.value": 2}])
    text = str(e.value)
    assert "input 'steps': 0 is outside the input's range 1..100000" in text
    assert "input 'model' is linked to node 999, which is not in the graph" in text
    assert "required input 'positive' is missing" in text
    assert f"input 'samples' is linked to output 5 of node {src}, which has 1 output(s)" in text
    assert "sweep row 1 (and 1 other row(s))" in text


def test_save_prefix_outside_the_output_folder_is_refused_before_any_job(workflow):
    plan = plan_jobs(workflow, StoredDefinitions())
    for prefix in ("../../elsewhere", "/tmp/abs", "a/../../b"):
        with pytest.raises(PlanError, match="saves outside ComfyUI's output folder"):
            runner.check_output_prefixes(plan, prefix)
    runner.check_output_prefixes(plan, "memora-batch/x")
    runner.check_output_prefixes(plan, "a/../b")
    api = json.loads(json.dumps(plan.jobs[0].api))
    saver = next(nid for nid, n in api.items() if "filename_prefix" in n["inputs"])
    api[saver]["inputs"]["filename_prefix"] = "../outside"
    escaping = plan_jobs(Workflow.load(api), StoredDefinitions())
    with pytest.raises(PlanError, match="'../outside' \\(from the workflow\\)"):
        runner.check_output_prefixes(escaping, "")
