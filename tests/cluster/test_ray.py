"""memora-batch --ray against a real Ray cluster of two nodes on this machine (`ray start --head --num-cpus 1` and a
second `ray start --address ... --num-cpus 1`, each in its own process group, all stopped here): the same metrics as
the embedded run bit for bit with a worker killed mid-job, and the errors that must come before any job runs (the
CLI path: --ray ADDRESS)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import ray  # noqa: F401  (the test extra installs it; this tier needs it)

from cluster_kit import ROOT, WORKFLOW, batch_args, jsonl

from memora_batch import cli

RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (what binding port 0 hands out), 32768 where unreadable."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


class LocalCluster:
    """Ray nodes started with `ray start` in their own process groups (killed by group at the end); a short temp
    dir of their own (Ray's socket paths must stay under 108 characters)."""

    def __init__(self, base_env: dict):
        self.tmp = tempfile.mkdtemp(prefix="mray", dir="/tmp")
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = base_env
        self.groups: list[int] = []

    def start(self, head: bool, **env) -> None:
        ports = sorted(_free_port() for _ in range(2))
        # worker ports below the kernel's ephemeral range, where _free_port's picks (GCS, node manager, object
        # manager) cannot land: a range overlapping one of them makes `ray start` refuse
        lo = 20000 + (len(self.groups) * 500) + (os.getpid() % 10) * 1000
        assert lo + 400 < _ephemeral_low(), (lo, _ephemeral_low())
        cmd = [RAY, "start", "--num-cpus", "1", "--disable-usage-stats", "--node-manager-port", str(ports[0]),
               "--object-manager-port", str(ports[1]), "--min-worker-port", str(lo),
               "--max-worker-port", str(lo + 400)]
        cmd += (["--head", "--port", str(self.port), "--temp-dir", self.tmp, "--include-dashboard", "false"]
                if head else ["--address", self.address])
        proc = subprocess.Popen(cmd, env={**self.env, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True, text=True)
        self.groups.append(proc.pid)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out[-3000:]

    def stop(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pgid in self.groups:
                try:
                    os.killpg(pgid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(2)
        subprocess.run(["rm", "-rf", self.tmp], check=False)


@pytest.fixture(scope="module")
def cluster(comfy, comfy_base):
    """Two nodes, one CPU each; workers use ComfyUI from $COMFYUI_PATH and comfy_base as their base directory."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), MEMORA_BATCH_BASE_DIRECTORY=str(comfy_base),
               OMP_NUM_THREADS="1", RAY_AUTH_MODE="disabled")
    c = LocalCluster(env)
    try:
        c.start(head=True)
        c.start(head=False)
        yield c
    finally:
        c.stop()


def test_an_unreachable_ray_address_is_refused_before_anything(sweep_csv, tmp_path, capsys):
    out = tmp_path / "results"
    rc = cli.main(batch_args(out, sweep_csv, "--ray", f"127.0.0.1:{_free_port()}"))
    err = capsys.readouterr().err
    assert rc == cli.EXIT_BAD_INPUT, err
    assert "the Ray cluster is unreachable" in err and "nothing was run" in err and "ray start --head" in err
    assert not out.exists()


def test_two_node_cluster_matches_embedded_bit_for_bit_and_survives_a_killed_worker(cluster, embedded_reference,
                                                                                     sweep_csv, tmp_path, capsys):
    """The four jobs on the two-node cluster, the second worker's process killed (SIGKILL, by its PID) 0.5 s into
    its first job: every job ends in the table once with the embedded run's metrics bit for bit, the killed job
    re-ran on the first worker with the lost try in its record. One run for both (the tier's time budget)."""
    from memora_batch import sweep as _sweep
    from memora_batch.profiles import model_profile
    from memora_batch.ray_backend import RayBackend
    from memora_batch.runner import plan_jobs, run_plan
    from memora_batch.workflow import Workflow

    backend = RayBackend(cluster.address, {}, max_retries=2)
    assert len(backend.infos) == 2 and len({i["node"] for i in backend.infos}) == 2  # one worker per node
    started, killed = [], []

    def kill_soon(job, worker):
        started.append((job.key, worker["name"]))
        if worker["name"] == "w2" and not killed:
            killed.append((job.key, worker["pid"]))
            threading.Timer(0.5, os.kill, (worker["pid"], signal.SIGKILL)).start()

    backend.on_job_start = kill_soon
    out = tmp_path / "results"
    try:
        plan = plan_jobs(Workflow.load(WORKFLOW), backend, _sweep.load_rows(str(sweep_csv)),
                         profile=model_profile("micro"), quick=True)
        summary = run_plan(plan, backend, out, progress=False)
    finally:
        backend.close()
    records = jsonl(out / "results.jsonl")
    assert sorted(r["key"] for r in records) == sorted(embedded_reference)  # every job, once
    for r in records:
        assert r["status"] == "ok"
        assert r["metrics"] == embedded_reference[r["key"]], r["key"]  # bit for bit
    # the killed job: re-run on the first worker, its lost try recorded
    key, pid = killed[0]
    redone = next(r for r in records if r["key"] == key)
    assert len(redone["retries"]) == 1 and f"w2 (pid {pid}" in redone["retries"][0]["worker"]
    assert redone["server"].startswith("ray:w1@")
    assert all(r["retries"] == [] for r in records if r["key"] != key)
    assert summary.ok == 4 and summary.retried == 1 and "ray:w1@" in summary.per_worker()
    assert "died" in capsys.readouterr().err
    # cache-aware placement: the two workers started the two groups (concept prompts), not one group twice
    concept = {r["key"]: r["overrides"]["Concept prompt.value"] for r in records}
    first = {w: concept[k] for k, w in reversed(started)}
    assert first["w1"] != first["w2"], started
    # output files came back to the driver, under the results folder
    for r in records:
        files = r["outputs"]["files"] + r["outputs"]["lora_paths"]
        assert files and all(Path(f).is_file() and Path(f).is_relative_to(out / "files") for f in files), files
        assert Path(r["outputs"]["lora_paths"][0]).stat().st_size > 0


def test_an_interrupt_stops_the_run_as_an_interrupt_with_nothing_half_recorded(cluster, sweep_csv, tmp_path):
    """Ctrl-C while a job runs on a worker: the run ends with KeyboardInterrupt (the CLI's "interrupted; rerun to
    resume"), not with the ValueError Ray raises for force-cancelling an actor task (which read as bad input)."""
    from memora_batch import sweep as _sweep
    from memora_batch.profiles import model_profile
    from memora_batch.ray_backend import RayBackend
    from memora_batch.runner import plan_jobs, run_plan
    from memora_batch.workflow import Workflow

    backend = RayBackend(cluster.address, {}, max_retries=2)
    started = []

    def interrupt_second(job, worker):
        started.append(job.key)
        if len(started) == 2:  # the first job is in flight on the other worker
            raise KeyboardInterrupt

    backend.on_job_start = interrupt_second
    out = tmp_path / "results"
    try:
        plan = plan_jobs(Workflow.load(WORKFLOW), backend, _sweep.load_rows(str(sweep_csv)),
                         profile=model_profile("micro"), quick=True)
        with pytest.raises(KeyboardInterrupt):
            run_plan(plan, backend, out, progress=False)
    finally:
        backend.close()
    assert not (out / "results.jsonl").exists() or jsonl(out / "results.jsonl") == []


def test_workers_without_comfyui_or_a_model_file_are_named_before_any_job(cluster, comfy, tiny_ckpt, sweep_csv,
                                                                          tmp_path, capsys):
    # no ComfyUI where the workers look for it
    out = tmp_path / "no-comfyui"
    rc = cli.main(batch_args(out, sweep_csv, "--ray", cluster.address, "--comfyui", str(tmp_path / "nowhere")))
    err = capsys.readouterr().err
    assert rc == cli.EXIT_BAD_INPUT, err
    assert err.count("no ComfyUI checkout there") == 2 and "worker w1 (pid" in err and "worker w2 (pid" in err
    assert "nothing was run" in err and not (out / "results.jsonl").exists()
    # a third node whose base directory lacks the checkpoint the jobs load
    empty = tmp_path / "empty-base"
    empty.mkdir()
    cluster.start(head=False, MEMORA_BATCH_BASE_DIRECTORY=str(empty))
    out = tmp_path / "no-model"
    rc = cli.main(["run", WORKFLOW, "--original", tiny_ckpt, "--unlearned", tiny_ckpt, "--quick", "--out", str(out),
                   "--no-progress", "--ray", cluster.address])
    err = capsys.readouterr().err
    assert rc == cli.EXIT_BAD_INPUT, err
    named = [line for line in err.splitlines() if "worker w" in line]
    assert len(named) == 1 and tiny_ckpt in err and "(pid" in named[0], err  # only the third node's worker
    assert not (out / "results.jsonl").exists()


def test_a_worker_without_the_pack_is_named_before_any_job(cluster, sweep_csv, tmp_path, capsys, monkeypatch):
    """A node on which comfyui-memora cannot be imported. The venv's editable install makes the pack importable
    everywhere on this machine, so the node's PYTHONPATH puts first a stand-in `memora_batch` whose import fails as
    an absent package's would; the driver runs from a folder without the pack (Ray adds the driver's working
    directory to every worker's sys.path). Its worker cannot even be created: the run stops naming it, and only it."""
    shadow = tmp_path / "no-pack"
    (shadow / "memora_batch").mkdir(parents=True)
    (shadow / "memora_batch" / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'memora_batch'\", name='memora_batch')\n")
    cluster.start(head=False, PYTHONPATH=str(shadow))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "no-pack-run"
    rc = cli.main(batch_args(out, sweep_csv, "--ray", cluster.address))
    err = capsys.readouterr().err
    assert rc == cli.EXIT_BAD_INPUT, err
    named = [line for line in err.splitlines() if "could not start" in line]
    assert len(named) == 1 and "worker w" in named[0] and "memora_batch" in named[0], err
    assert "is comfyui-memora installed on every machine" in err and "nothing was run" in err
    assert not (out / "results.jsonl").exists()
