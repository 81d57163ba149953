"""memora-batch's review findings (issue 17 follow-up): `curve` checks the metric names it is given before any job
runs, judges no curve when no job finished, and exits 1 when a job failed; `convert` never replaces a file created
while it converted; a worker whose record cannot be written stops the run with that error; no job is recorded once
the run was stopped; a lock the operating system refuses is a clear folder error. Jobs run on backends that return at
once (tests/support/batch_kit.py): the bookkeeping is what is tested, with real files."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import threading
from pathlib import Path

import pytest

from memora_batch import cli
from memora_batch.backend import RunResult
from memora_batch.server_client import ComfyServer, run_jobs

from batch_kit import Instant, StoredDefinitions

ROOT = Path(__file__).resolve().parents[2]
SWEEP = str(ROOT / "example_workflows" / "recovery_sweep.json")


class FailsSome(Instant):
    """Jobs ``fail`` (indices in the order run) fail with a node error; the others succeed."""

    def __init__(self, fail):
        super().__init__()
        self.fail = set(fail)

    def run(self, prompt, timeout=None):
        result = super().run(prompt, timeout)
        if len(self.ran) - 1 in self.fail:
            return RunResult(result.prompt_id, False, {}, {"exception_message": "boom", "node_id": "1"}, "instant")
        return result


def _curve(monkeypatch, backend, out: Path, *extra) -> int:
    monkeypatch.setattr(cli, "_backend", lambda args: backend)
    # --no-snapshots: one job per budget (the job counts below); the snapshot curve: tests/unit/test_curve_snapshots.py
    return cli.main(["curve", SWEEP, "--steps", "1,2", "--out", str(out), "--no-progress", "--no-snapshots", *extra])


@pytest.mark.parametrize("option", ["--detector", "--similarity"])
def test_curve_refuses_a_metric_of_no_node_before_any_job_runs(monkeypatch, tmp_path, capsys, option):
    backend = Instant()
    assert _curve(monkeypatch, backend, tmp_path / "c", option, "Concept scor (recovered).rate") \
        == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert f"{option} 'Concept scor (recovered).rate': expected '<node title>.<score>'" in err
    assert "Concept score (recovered)" in err  # the titles it could have named
    assert backend.ran == [] and not (tmp_path / "c").exists()
    for bare in ("Concept score (recovered)", "Concept score (recovered)."):  # a title without a score name
        assert _curve(monkeypatch, backend, tmp_path / "c", option, bare) == cli.EXIT_BAD_INPUT
    assert backend.ran == []


def test_curve_with_no_finished_job_says_so_and_exits_1(monkeypatch, tmp_path, capsys):
    backend = FailsSome(range(10))
    rc = _curve(monkeypatch, backend, tmp_path / "c", "--detector", "Concept score (recovered).rate")
    out = capsys.readouterr().out
    assert rc == cli.EXIT_JOB_FAILED and len(backend.ran) == 2
    assert "no finished jobs to judge" in out
    assert not (tmp_path / "c" / "curve.json").exists()


def test_curve_exits_1_when_a_job_failed_and_still_judges_the_rest(monkeypatch, tmp_path, capsys):
    backend = FailsSome({0})
    assert _curve(monkeypatch, backend, tmp_path / "c") == cli.EXIT_JOB_FAILED
    assert "1 ok, 1 failed" in capsys.readouterr().out
    assert json.loads((tmp_path / "c" / "curve.json").read_text())["steps"] == [1, 2]
    backend = Instant()  # all ok: exit 0
    assert _curve(monkeypatch, backend, tmp_path / "d") == 0 and len(backend.ran) == 2


def test_convert_never_replaces_a_file_created_while_it_converted(monkeypatch, tmp_path, capsys):
    out = tmp_path / "api.json"

    class Racing(StoredDefinitions):
        @classmethod
        def boot(cls, *args, **kwargs):
            return cls()

        def object_info(self, node_types):
            out.write_text("theirs")  # another program writes -o after convert checked it
            return super().object_info(node_types)

    monkeypatch.setattr(cli, "EmbeddedBackend", Racing)
    assert cli.main(["convert", SWEEP, "-o", str(out)]) == cli.EXIT_BAD_INPUT
    assert "refusing to overwrite" in capsys.readouterr().err
    assert out.read_text() == "theirs"
    out.unlink()
    assert cli.main(["convert", SWEEP, "-o", str(out), "--force"]) == 0  # --force replaces it
    assert isinstance(json.loads(out.read_text()), dict) and out.read_text() != "theirs"


class Local(ComfyServer):
    """A server whose prompts finish at once (no HTTP): ``during`` runs inside each job."""

    def __init__(self, url, during=None):
        super().__init__(url)
        self.during = during

    def run(self, prompt, timeout=None):
        if self.during:
            self.during()
        return RunResult("p", True, {}, None, self.url)


def test_a_record_that_cannot_be_written_stops_the_run_with_its_error():
    done = []

    def on_done(job, result, seconds):
        done.append(job)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        run_jobs([Local("http://a:1"), Local("http://b:1")], list(range(6)), lambda j: {}, on_done)
    assert len(done) == 1  # the other worker records nothing after the failure


def test_no_job_is_recorded_after_the_run_was_stopped():
    stop = threading.Event()
    done = []
    left = run_jobs([Local("http://a:1", during=stop.set)], [1, 2], lambda j: {},
                    lambda job, result, seconds: done.append(job), stop=stop)
    assert done == [] and sorted(left) == [1, 2]  # stopped (Ctrl-C) while job 1 ran: neither recorded


def test_a_lock_the_system_refuses_is_a_folder_error_and_leaks_nothing(monkeypatch, tmp_path):
    fcntl = pytest.importorskip("fcntl")
    from memora_batch.folder import FolderUnwritable, ResultsFolder

    def refuse(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", refuse)
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(FolderUnwritable, match="cannot be locked .*nothing was run"):
        ResultsFolder(tmp_path / "r").acquire()
    assert set(os.listdir("/proc/self/fd")) <= before


def test_a_micro_world_results_folder_is_not_reused_for_another_world(tmp_path, monkeypatch, capsys):
    """Micro-world jobs are keyed by the graph, which names a variant, not the weights: the demo's results folder is
    marked with the world's manifest sha256, and a folder of another world (or one made before the mark) is moved
    aside rather than its jobs taken as done; the same world keeps its folder."""
    worlds = {}
    for name, text in (("a", '{"about": "world a"}'), ("b", '{"about": "world b"}')):
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text(text)
        worlds[name] = tmp_path / name
    results = tmp_path / "results"
    results.mkdir()
    (results / "results.jsonl").write_text('{"key": "k1", "status": "ok"}\n')  # a folder from before the mark
    monkeypatch.setenv("MEMORA_MICRO_WEIGHTS", str(worlds["a"]))
    aside = cli.claim_for_micro_world(results)
    assert aside == tmp_path / "results.world-unknown" and (aside / "results.jsonl").is_file()
    assert "moved to results.world-unknown" in capsys.readouterr().err
    sha_a = json.loads((results / cli.MICRO_WORLD_MARK).read_text())["manifest_sha256"]
    assert len(sha_a) == 64 and sorted(p.name for p in results.iterdir()) == [cli.MICRO_WORLD_MARK]
    (results / "results.jsonl").write_text('{"key": "k2", "status": "ok"}\n')
    assert cli.claim_for_micro_world(results) is None  # the same world: kept as it is
    assert (results / "results.jsonl").read_text().startswith('{"key": "k2"')
    monkeypatch.setenv("MEMORA_MICRO_WEIGHTS", str(worlds["b"]))
    moved = cli.claim_for_micro_world(results)
    assert moved == tmp_path / f"results.world-{sha_a[:12]}" and (moved / "results.jsonl").is_file()
    assert not (results / "results.jsonl").exists()
    assert json.loads((results / cli.MICRO_WORLD_MARK).read_text())["manifest_sha256"] != sha_a
    # never from under a run that holds the folder
    import fcntl

    from memora_batch.folder import LOCK_NAME, FolderLocked

    (results / "results.jsonl").write_text('{"key": "k3", "status": "ok"}\n')
    with open(results / LOCK_NAME, "w") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        monkeypatch.setenv("MEMORA_MICRO_WEIGHTS", str(worlds["a"]))
        with pytest.raises(FolderLocked, match="in use by another memora-batch run"):
            cli.claim_for_micro_world(results)
    assert (results / "results.jsonl").read_text().startswith('{"key": "k3"')


def test_a_folder_without_job_records_is_marked_in_place_not_moved(tmp_path, monkeypatch, capsys):
    """Only job records can be resumed by mistake: a --out folder that holds other files (or a mark of another world
    and no records) stays where it is, its files untouched, and gets this world's mark."""
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "manifest.json").write_text('{"about": "world w"}')
    monkeypatch.setenv("MEMORA_MICRO_WEIGHTS", str(tmp_path / "w"))
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("the user's own file")
    (out / cli.MICRO_WORLD_MARK).write_text('{"manifest_sha256": "0123456789abcdef"}\n')
    assert cli.claim_for_micro_world(out) is None
    assert (out / "notes.txt").read_text() == "the user's own file"
    assert not list(tmp_path.glob("mine.world-*")) and "moved" not in capsys.readouterr().err
    sha = json.loads((out / cli.MICRO_WORLD_MARK).read_text())["manifest_sha256"]
    assert sha == hashlib.sha256(b'{"about": "world w"}').hexdigest()
