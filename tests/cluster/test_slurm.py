"""memora-batch --slurm through submitit's local executor (the shards run as local processes, as array tasks would
on SLURM nodes): one shard is killed while it runs, its finished job is merged, a rerun runs only what is left, and
the four jobs end with the embedded run's metrics bit for bit."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import submitit  # noqa: F401  (the test extra installs it; this tier needs it)
from cluster_kit import batch_args, jsonl

from memora_batch import cli


def _kill_second_shard_after_its_first_job(slurm_dir: Path, killed: list, stop: threading.Event) -> None:
    """Wait for shard-1's first result line, then SIGKILL the shard's process (its PID from shard-1.json)."""
    while not stop.is_set():
        for status in slurm_dir.glob("*/shard-1.json"):
            lines = status.with_suffix(".jsonl")
            if lines.exists() and lines.read_bytes().count(b"\n") >= 1:
                pid = json.loads(status.read_text())["pid"]
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
        time.sleep(0.05)


def test_slurm_shards_match_embedded_and_a_killed_shard_is_resumed(comfy, comfy_base, embedded_reference, sweep_csv,
                                                                    tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MEMORA_BATCH_BASE_DIRECTORY", str(comfy_base))  # the shards' ComfyUI folders
    out = tmp_path / "results"
    args = batch_args(out, sweep_csv, "--slurm", "--slurm-executor", "local", "--slurm-shards", "2")
    killed, stop = [], threading.Event()
    watcher = threading.Thread(target=_kill_second_shard_after_its_first_job, args=(out / "slurm", killed, stop))
    watcher.start()
    try:
        rc = cli.main(args)
    finally:
        stop.set()
        watcher.join()
    first = capsys.readouterr()
    assert killed, first.err
    assert rc == cli.EXIT_JOB_FAILED, first.err  # a job was not run
    assert "3 ok, 0 failed, 0 already done, 1 not run" in first.out
    assert "ended without finishing" in first.err
    assert len(jsonl(out / "results.jsonl")) == 3
    # each shard wrote its own results shard; the driver merged them into the one table
    shards = sorted(out.glob("slurm/*/shard-*.jsonl"))
    assert [len(jsonl(s)) for s in shards] == [2, 1]

    rc = cli.main(args)  # the rerun: only the killed shard's unfinished job runs
    second = capsys.readouterr()
    assert rc == 0, second.err
    assert "1 ok, 0 failed, 3 already done" in second.out
    records = jsonl(out / "results.jsonl")
    assert sorted(r["key"] for r in records) == sorted(embedded_reference)  # every job once
    for r in records:
        assert r["status"] == "ok" and r["server"].startswith("slurm:shard-")
        assert r["metrics"] == embedded_reference[r["key"]], r["key"]  # bit for bit
        assert r["outputs"]["files"] and all(Path(f).is_file() for f in r["outputs"]["files"])
