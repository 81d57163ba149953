"""The results folder (issue 17, items 5 and 6): one run at a time (a lock naming the other run), nothing overwritten
that memora-batch did not write unless --force, a torn last line repaired and reported, files created with the
user's umask, and a read-only or full folder found before the first job. Real files, real processes and (where the
machine allows mounting) real read-only and full filesystems; jobs run on a backend that returns at once, so the
bookkeeping is what is tested."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from memora_batch import cli
from memora_batch.report import write_report
from memora_batch.results import ResultsStore
from memora_batch.runner import plan_jobs, run_plan
from memora_batch.workflow import Workflow

from batch_kit import DEFINITIONS, Instant

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def workflow():
    wf = Workflow.load(ROOT / "example_workflows" / "recovery_sweep.json")
    wf.to_api(DEFINITIONS)
    return wf


def _plan(workflow, backend, n=3):
    return plan_jobs(workflow, backend, [{"Evaluation seed.value": i} for i in range(n)])


def _hold_lock(folder: Path):
    """Another process that holds the folder's lock until killed."""
    code = ("import sys, time; from memora_batch.folder import ResultsFolder\n"
            "with ResultsFolder(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_run_into_a_locked_folder_names_the_other_run_and_runs_nothing(workflow, tmp_path):
    from memora_batch.folder import FolderLocked

    other = _hold_lock(tmp_path)
    try:
        backend = Instant()
        with pytest.raises(FolderLocked) as e:
            run_plan(_plan(workflow, backend), backend, tmp_path, progress=False)
        assert f"PID {other.pid} on " in str(e.value) and "started 20" in str(e.value)
        assert backend.ran == [] and not (tmp_path / "results.jsonl").exists()
    finally:
        other.kill()
        other.wait()
    # the kernel released the killed run's lock: the next run goes ahead (no stale lock)
    backend = Instant()
    summary = run_plan(_plan(workflow, backend), backend, tmp_path, progress=False)
    assert (summary.ok, len(backend.ran)) == (3, 3)


def test_report_or_table_not_written_by_memora_batch_needs_force(workflow, tmp_path, capsys):
    from memora_batch.folder import FolderNotOurs, ResultsFolder

    mine = "# My notes\nkeep me\n"
    (tmp_path / "report.md").write_text(mine)
    backend = Instant()
    with pytest.raises(FolderNotOurs, match="report.md not written by memora-batch.*--force"):
        with ResultsFolder(tmp_path):
            pass
    assert (tmp_path / "report.md").read_text() == mine and sorted(os.listdir(tmp_path)) == ["report.md"]
    with ResultsFolder(tmp_path, force=True) as folder:
        run_plan(_plan(workflow, backend), backend, tmp_path, progress=False, folder=folder)
        write_report(tmp_path, "w")
    assert (tmp_path / "report.md").read_text().startswith("# memora-batch: w")
    # memora-batch's own results folder resumes without --force: derived files rewritten, finished jobs skipped
    backend = Instant()
    with ResultsFolder(tmp_path) as folder:
        summary = run_plan(_plan(workflow, backend, 4), backend, tmp_path, progress=False, folder=folder)
    assert (summary.skipped, summary.ok, len(backend.ran)) == (3, 1, 1)
    (tmp_path / "results.csv").write_text("name,score\nmine,1\n")
    with pytest.raises(FolderNotOurs, match="results.csv"):
        ResultsFolder(tmp_path).acquire()


def test_convert_never_writes_over_its_input_or_an_existing_file(tmp_path, capsys):
    wf = tmp_path / "w.json"
    original = (ROOT / "example_workflows" / "recovery_sweep.json").read_text()
    wf.write_text(original)
    assert cli.main(["convert", str(wf), "-o", str(wf)]) == cli.EXIT_BAD_INPUT
    assert "is the input workflow itself" in capsys.readouterr().err
    assert cli.main(["convert", str(wf), "-o", str(wf), "--force"]) == cli.EXIT_BAD_INPUT  # not even with --force
    link = tmp_path / "link.json"
    link.symlink_to(wf)
    assert cli.main(["convert", str(wf), "-o", str(link), "--force"]) == cli.EXIT_BAD_INPUT
    other = tmp_path / "api.json"
    other.write_text("{}")
    assert cli.main(["convert", str(wf), "-o", str(other)]) == cli.EXIT_BAD_INPUT
    assert "exists; pass --force" in capsys.readouterr().err
    assert wf.read_text() == original and other.read_text() == "{}"


def _record(key):
    return {"key": key, "status": "ok", "row": 0, "overrides": {}, "metrics": {}}


def test_torn_last_line_is_reported_and_cut_off_before_the_next_record(tmp_path):
    store = ResultsStore(tmp_path)
    store.append(_record("k1"))
    with open(tmp_path / "results.jsonl", "ab") as f:
        f.write(b'{"key": "k2", "status": "o')  # killed mid-write
    store = ResultsStore(tmp_path)
    assert store.finished_keys() == {"k1"}
    assert len(store.problems) == 1 and "cut short" in store.problems[0] and "runs again" in store.problems[0]
    store.append(_record("k2"))  # the rerun's record
    again = ResultsStore(tmp_path)
    assert again.finished_keys() == {"k1", "k2"} and again.problems == []
    assert [json.loads(x)["key"] for x in (tmp_path / "results.jsonl").read_text().splitlines()] == ["k1", "k2"]
    assert (tmp_path / "results.jsonl.torn").read_text() == '{"key": "k2", "status": "o\n'


def test_last_record_missing_only_its_newline_is_kept(tmp_path):
    (tmp_path / "results.jsonl").write_text(json.dumps(_record("k1")))
    store = ResultsStore(tmp_path)
    assert store.finished_keys() == {"k1"} and "k1 kept" in store.problems[0]
    store.append(_record("k2"))
    assert ResultsStore(tmp_path).finished_keys() == {"k1", "k2"}


def test_record_glued_to_a_torn_line_by_an_older_version_is_recovered(tmp_path):
    (tmp_path / "results.jsonl").write_text('{"key": "k1", "sta' + json.dumps(_record("k2")) + "\n")
    store = ResultsStore(tmp_path)
    assert store.finished_keys() == {"k2"} and "line 1 is not valid JSON" in store.problems[0]


def test_results_jsonl_that_is_not_memora_batchs_is_refused(tmp_path):
    from memora_batch.results import ResultsError

    (tmp_path / "results.jsonl").write_text('{"user": "data"}\n')
    with pytest.raises(ResultsError, match="line 1 is not a memora-batch job record"):
        ResultsStore(tmp_path)


def test_result_files_follow_the_umask(workflow, tmp_path):
    old = os.umask(0o002)
    try:
        backend = Instant()
        run_plan(_plan(workflow, backend, 1), backend, tmp_path, progress=False)
        write_report(tmp_path, "w")
        (tmp_path / "results.jsonl").write_bytes((tmp_path / "results.jsonl").read_bytes() + b'{"key": "x"')
        ResultsStore(tmp_path).append({"key": "k", "status": "ok"})  # cuts the torn line into results.jsonl.torn
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == {"results.jsonl": 0o664, "results.csv": 0o664, "report.md": 0o664, "memora-batch.lock": 0o664,
                     "results.jsonl.torn": 0o664}


def _mount_tmpfs(path: Path, options: str):
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()})")


@pytest.mark.parametrize("case, message", [("new folder, read-only", "Read-only file system; nothing was run"),
                                           ("resumed folder, read-only", "is not writable.*nothing was run"),
                                           ("full", "full filesystem|cannot be written|cannot create folder")])
def test_read_only_or_full_results_folder_is_found_before_the_first_job(workflow, tmp_path, case, message):
    from memora_batch.folder import FolderUnwritable

    mnt = tmp_path / "mnt"
    _mount_tmpfs(mnt, "size=64k")
    try:
        if case.startswith("resumed"):
            ResultsStore(mnt / "results").append(_record("k0"))
        if "read-only" in case:
            subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        else:  # fill it up
            with open(mnt / "filler", "wb", buffering=0) as f:
                try:
                    while True:
                        f.write(b"\0" * 4096)
                except OSError:
                    pass
        backend = Instant()
        with pytest.raises(FolderUnwritable, match=message):
            run_plan(_plan(workflow, backend), backend, mnt / "results", progress=False)
        assert backend.ran == []
    finally:
        for _ in range(20):
            if subprocess.run(["umount", str(mnt)], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)


def test_move_aside_takes_a_free_name_moves_everything_and_never_a_held_folder(tmp_path):
    import fcntl

    from memora_batch.folder import LOCK_NAME, FolderLocked, move_aside

    results = tmp_path / "r"
    results.mkdir()
    (results / "results.jsonl").write_text('{"key": "k1"}\n')
    (tmp_path / "r.world-abc").mkdir()  # taken: the next free name is used
    aside = move_aside(results, "r.world-abc")
    assert aside == tmp_path / "r.world-abc-2" and not results.exists()
    assert (aside / "results.jsonl").read_text() == '{"key": "k1"}\n'
    with open(aside / LOCK_NAME, "w") as held:  # a run holds it: nothing moves
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        with pytest.raises(FolderLocked, match="in use by another memora-batch run.*nothing was run"):
            move_aside(aside, "elsewhere")
    assert aside.is_dir() and not (tmp_path / "elsewhere").exists()
