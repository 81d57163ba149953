"""--ray / --slurm without ComfyUI: the extras they need, the options they refuse, and the Ray placement rule."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from memora_batch import cli
from memora_batch.ray_backend import _Placement, check_reachable, ClusterError

ROOT = Path(__file__).resolve().parents[2]
SWEEP = str(ROOT / "example_workflows" / "recovery_sweep.json")


@pytest.mark.parametrize("flag, module, extra", [(["--ray"], "ray", "ray"), (["--slurm"], "submitit", "slurm")])
def test_a_cluster_flag_without_its_extra_names_the_extra_to_install(flag, module, extra, monkeypatch, tmp_path,
                                                                    capsys):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    out = tmp_path / "results"
    rc = cli.main(["run", SWEEP, "--out", str(out), *flag])
    err = capsys.readouterr().err
    assert rc == cli.EXIT_BAD_INPUT
    assert f"{flag[0]} needs {module}, which is not installed: pip install 'comfyui-memora[{extra}]'" in err
    assert not out.exists()


def test_two_places_to_run_are_refused(tmp_path, capsys):
    rc = cli.main(["run", SWEEP, "--out", str(tmp_path / "r"), "--ray", "--server", "http://127.0.0.1:1"])
    assert rc == cli.EXIT_BAD_INPUT
    assert "--server and --ray: choose one place to run the jobs" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["-1", "x", "nan"])
def test_cluster_numbers_are_checked_by_the_parser(value, capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["run", SWEEP, "--max-retries", value])
    assert "--max-retries" in capsys.readouterr().err


def test_a_malformed_ray_address_says_what_is_expected():
    with pytest.raises(ClusterError, match="expected 'auto', 'local', HOST:PORT or ray://HOST:PORT"):
        check_reachable("gpu1")


def _placement(groups: dict) -> _Placement:
    """Jobs named '<group><n>', grouped by their first letter (a stand-in graph whose training input is the group)."""
    jobs = [f"{g}{i}" for g, n in groups.items() for i in range(n)]

    def prompt(job):
        return {"1": {"class_type": "Seed", "inputs": {"text": job[0]}},
                "2": {"class_type": "MemoRaLoRATrain", "inputs": {"x": ["1", 0], "steps": int(job[1:])}}}

    return _Placement(jobs, prompt)


def test_placement_keeps_a_group_on_its_worker_and_hands_a_dead_workers_job_on():
    p = _placement({"a": 3, "b": 2})
    assert [p.take("w1"), p.take("w2")] == ["a0", "b0"]  # each worker starts a group
    assert p.take("w1") == "a1"  # and keeps it
    lost = p.take("w2")
    assert lost == "b1"
    p.put_back(lost)  # w2 died with b1
    p.release("w2")
    assert p.take("w1") == "a2"  # its own group first
    assert p.take("w1") == "b1"  # then the dead worker's, which it now owns
    assert p.take("w1") is None and p.left() == []


def test_placement_shares_the_largest_group_only_when_it_has_two_jobs_or_more():
    p = _placement({"a": 3})
    assert p.take("w1") == "a0"
    assert p.take("w2") == "a2"  # two left: the idle worker takes one from the far end
    assert p.take("w2") is None  # one left: it stays with its owner
    assert p.take("w1") == "a1"


def test_same_named_files_from_two_machines_are_kept_apart_per_job(tmp_path):
    """Two machines number their outputs on their own: jobs on different workers send back files of the same name.
    Each job's files land under files/<job key>/, neither replaces the other, each record points at its own; a
    different file already at a job's place is kept and the new one takes a numbered name."""
    from types import SimpleNamespace

    from memora_batch.ray_backend import RayBackend

    backend = RayBackend.__new__(RayBackend)  # only the driver's file bookkeeping, no cluster
    backend.shared_output, backend.paths, backend.overheads = False, {}, []
    backend.bind_results(tmp_path)
    fids = {"lora:memora/recovered_00001_.safetensors": "/w/models/loras/memora/recovered_00001_.safetensors",
            "file:output/memora/img_00001_.png": "/w/output/memora/img_00001_.png"}
    seen = {}
    for key, content in (("aaaa", b"from worker 1"), ("bbbb", b"from worker 2")):
        backend._receive(SimpleNamespace(key=key), dict(fids), {f: content + f.encode() for f in fids})
        item = {"filename": "img_00001_.png", "subfolder": "memora", "type": "output"}
        seen[key] = (backend.resolve_lora("memora/recovered_00001_.safetensors"), backend.resolve_file(item))
    for key, content in (("aaaa", b"from worker 1"), ("bbbb", b"from worker 2")):
        lora, image = map(Path, seen[key])
        assert lora.is_relative_to(tmp_path / "files" / key) and image.is_relative_to(tmp_path / "files" / key)
        assert lora.read_bytes() == content + b"lora:memora/recovered_00001_.safetensors"
        assert image.read_bytes() == content + b"file:output/memora/img_00001_.png"
    # the same job again (a rerun after a crash) with other bytes: the first file stays, the new one is numbered
    backend._receive(SimpleNamespace(key="aaaa"), dict(fids), {f: b"again" for f in fids})
    again = Path(backend.resolve_lora("memora/recovered_00001_.safetensors"))
    assert again.name == "recovered_00001_ (2).safetensors" and again.read_bytes() == b"again"
    assert Path(seen["aaaa"][0]).read_bytes() == b"from worker 1lora:memora/recovered_00001_.safetensors"


def test_a_backend_without_node_events_gets_one_job_bar_with_per_worker_counts(tmp_path, capsys):
    """Ray-like: every graph asked for up front (placement), jobs started by the backend's own callback on named
    workers, no node events. One bar over the jobs, its postfix the jobs each worker finished (w1:2 w2:1); no per-job
    node bar opened for the graphs asked for up front."""
    from batch_kit import Instant, example_workflow

    from memora_batch.backend import RunResult
    from memora_batch.runner import plan_jobs, run_plan

    class TwoWorkers(Instant):
        def run_all(self, jobs, prompt_of, on_done, job_timeout=None, on_start=None):
            prompts = [prompt_of(j) for j in jobs]  # placement reads every graph first
            for i, (job, prompt) in enumerate(zip(jobs, prompts)):
                worker = "w1" if i % 3 != 1 else "w2"
                on_start(job, worker)
                on_done(job, RunResult(f"p{i}", True, {}, None, f"ray:{worker}@host"), 0.01, "t")
            return []

    backend = TwoWorkers()
    assert not backend.node_events
    wf = example_workflow("recovery_sweep", definitions=True)
    plan = plan_jobs(wf, backend, [{"Evaluation seed.value": i} for i in range(3)])
    summary = run_plan(plan, backend, tmp_path / "r", progress=True)
    err = capsys.readouterr().err
    assert summary.ok == 3
    assert "jobs: 100%" in err and "w1:2 w2:1" in err, err
    assert " node/s" not in err and "job 1/3" not in err, err  # no per-job node bar


def test_results_csv_shows_each_jobs_lost_tries():
    import csv
    import io

    from memora_batch.results import csv_text

    lost = [{"worker": "w2 (pid 7 on h, Ray node abc)", "error": "ActorDiedError: killed"}]
    rows = list(csv.DictReader(io.StringIO(csv_text([
        {"key": "a", "status": "ok", "row": 0, "server": "ray:w1@h", "retries": lost},
        {"key": "b", "status": "ok", "row": 1, "server": "ray:w2@h", "retries": []}]))))
    assert [(r["key"], r["retries"]) for r in rows] == [("a", "1"), ("b", "0")]


def test_worker_count_from_the_cluster_resources():
    from memora_batch.ray_backend import _worker_count

    gpus8 = {"CPU": 4.0, "GPU": 8.0}
    assert _worker_count(gpus8, 1.0, 1.0) == 4  # CPUs bound it
    assert _worker_count(gpus8, 0.0, 1.0) == 8  # --ray-cpus-per-worker 0: only the GPUs do
    assert _worker_count({"CPU": 6.0}, 2.0, 0.0) == 3
    assert _worker_count({"CPU": 3.0}, 0.0, 0.0) == 3  # neither asked for: one per CPU
