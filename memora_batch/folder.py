"""The results folder of a run: one run at a time, nothing overwritten that memora-batch did not write, and found
writable before the first job.

- **Lock**: ``memora-batch.lock`` in the folder, held with the operating system's file lock (``flock`` on POSIX,
  ``msvcrt.locking`` on Windows) from before the first job until the report is written. The kernel releases it when
  the process ends, however it ends (kill -9 included), so a lock is never stale. The file holds the holder's PID,
  host, start time and command line; a second run into the same folder stops with :class:`FolderLocked` naming them.
- **Whose files**: ``results.jsonl`` is the record of finished jobs (appended, never rewritten); ``results.csv``,
  ``report.md``, ``report.html``, ``curve.json`` and ``asr.csv`` are derived from it and rewritten by every run
  (resume included); ``memora-batch rescore`` writes ``results.<convention>.jsonl`` / ``.csv`` and
  ``asr.<convention>.csv`` (named by the holder as ``derived``). A derived file that exists but was not written by
  memora-batch (it lacks memora-batch's header, or its first line is not a memora-batch record) is replaced only with
  ``--force`` (:class:`FolderNotOurs`); a ``results.jsonl`` whose lines are not memora-batch records is never
  appended to.
- **Writable**: the lock is written and fsync'ed into the folder and ``results.jsonl`` opened for appending before
  anything runs, and the filesystem must have :data:`MIN_FREE_BYTES` free (:class:`FolderUnwritable`)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from pathlib import Path
from typing import Optional

from memora.fileio import UnwritableFolderError, make_folder

from .backend import now
from .sweep import ASR_SIGNATURE

LOCK_NAME = "memora-batch.lock"
#: the derived files a run rewrites, and how memora-batch's own version of each begins
DERIVED_SIGNATURES = {"results.csv": "key,status,row", "report.md": "# memora-batch: ", "curve.json": '{\n  "steps": ',
                      "report.html": "<!DOCTYPE html>\n<!-- memora-batch report -->",
                      "asr.csv": ASR_SIGNATURE}
#: a JSON-lines file of memora-batch's starts with a job record (checked by parsing its first line)
JSONL_RECORD = "<a memora-batch job record>"


def signature(name: str) -> str:
    """How memora-batch's own version of the derived file ``name`` begins: a run's fixed files, and rescore's
    ``results.<convention>.csv`` / ``.jsonl`` and ``asr.<convention>.csv`` (those of results.csv, a job record and
    asr.csv). KeyError for a name memora-batch never writes."""
    if name in DERIVED_SIGNATURES:
        return DERIVED_SIGNATURES[name]
    stem, _, ext = name.rpartition(".")
    if stem.startswith("results.") and ext == "csv":
        return DERIVED_SIGNATURES["results.csv"]
    if stem.startswith("results.") and ext == "jsonl" and stem != "results":
        return JSONL_RECORD
    if stem.startswith("asr.") and ext == "csv":
        return DERIVED_SIGNATURES["asr.csv"]
    raise KeyError(f"{name} is not a file memora-batch derives")
MIN_FREE_BYTES = 1 << 20


class FolderError(ValueError):
    """The results folder cannot be used as asked; raised before any job runs."""


class FolderLocked(FolderError):
    pass


class FolderNotOurs(FolderError):
    pass


class FolderUnwritable(FolderError):
    pass


def _try_lock(fd: int) -> bool:
    """True when locked, False when another process holds the lock; any other OSError propagates."""
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:  # lock one byte far past the holder's details, so that a second run can still read them
            os.lseek(fd, 1 << 30, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
        finally:
            os.lseek(fd, 0, os.SEEK_SET)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        return (f"PID {info.get('pid')} on {info.get('host')}, started {info.get('started')} "
                f"({' '.join(info.get('argv') or [])})")
    except (OSError, ValueError, AttributeError):
        return "a process that has not written its details yet"


def _in_use(path: Path, lock: Path) -> FolderLocked:
    return FolderLocked(f"results folder {path} is in use by another memora-batch run: {_holder(lock)}. Wait for it "
                        f"to finish, or give this run another --out; nothing was run")


def move_aside(path: "str | Path", stem: str) -> Path:
    """Rename the results folder ``path`` to a free sibling name (``stem``, then ``stem-2``, ...), holding its lock
    so that no run writes into it meanwhile: FolderLocked, nothing moved, while a run holds it. Returns the new
    path; everything in the folder goes with it."""
    path = Path(path)
    lock = path / LOCK_NAME
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if not _try_lock(fd):
            raise _in_use(path, lock)
        aside, n = path.with_name(stem), 1
        while aside.exists():
            n += 1
            aside = path.with_name(f"{stem}-{n}")
        path.rename(aside)
    finally:
        os.close(fd)
    return aside


class ResultsFolder:
    """``with ResultsFolder(path, force=...):`` holds the lock for the block; every check is made on entry.
    ``run_files``: the holder rewrites a run's derived files (results.csv, report.md, report.html, curve.json,
    asr.csv), so foreign ones stop it; False for a holder that writes only its ``derived`` files (rescore), which a
    foreign report.html it never touches must not stop."""

    def __init__(self, path: "str | Path", force: bool = False, derived: tuple[str, ...] = (), run_files: bool = True):
        self.path = Path(path)
        self.force = force
        #: the derived files the holder writes, checked with the run's own (``signature``)
        self.derived = tuple(dict.fromkeys([*(DERIVED_SIGNATURES if run_files else ()), *derived]))
        for name in self.derived:
            signature(name)  # a name memora-batch never writes is a programming error, found at once
        self._fd: Optional[int] = None

    def __enter__(self) -> "ResultsFolder":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        if self.path.is_dir():
            self._check_foreign()  # before creating anything in a folder that is not memora-batch's (again once locked)
        try:
            make_folder(self.path)
        except UnwritableFolderError as e:
            raise FolderUnwritable(f"results folder {self.path}: {e}; nothing was run") from None
        lock = self.path / LOCK_NAME
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise FolderUnwritable(f"results folder {self.path} is not writable ({e.strerror or e}); nothing "
                                   f"was run") from None
        try:
            locked = _try_lock(fd)
        except OSError as e:  # e.g. ENOLCK, or a filesystem without locks
            os.close(fd)
            raise FolderUnwritable(f"results folder {self.path} cannot be locked ({e.strerror or e}); nothing "
                                   f"was run") from None
        if not locked:
            os.close(fd)
            raise _in_use(self.path, lock)
        self._fd = fd
        try:
            self._write_info(fd)
            self._check_files()
        except BaseException:
            self.release()
            raise

    def _write_info(self, fd: int) -> None:
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": now(), "argv": sys.argv}
        data = (json.dumps(info) + "\n").encode("utf-8")
        try:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, data)
            os.fsync(fd)
            free = shutil.disk_usage(self.path).free
        except OSError as e:
            raise FolderUnwritable(f"results folder {self.path} cannot be written ({e.strerror or e}); nothing "
                                   f"was run") from None
        if free < MIN_FREE_BYTES:
            raise FolderUnwritable(f"results folder {self.path} is on a full filesystem ({free} bytes free, "
                                   f"at least {MIN_FREE_BYTES} needed); nothing was run")

    def _check_files(self) -> None:
        jsonl = self.path / "results.jsonl"
        if jsonl.exists():
            try:
                os.close(os.open(jsonl, os.O_WRONLY | os.O_APPEND))
            except OSError as e:
                raise FolderUnwritable(f"{jsonl} cannot be appended to ({e.strerror or e}); nothing was run") from None
        self._check_foreign()

    def _check_foreign(self) -> None:
        foreign = [name for name in self.derived if (self.path / name).exists()
                   and not _starts_with(self.path / name, signature(name))]
        if foreign and not self.force:
            raise FolderNotOurs(f"results folder {self.path} holds {', '.join(foreign)} not written by memora-batch; "
                                f"memora-batch rewrites these files: pass --force to replace them, or choose another "
                                f"--out; nothing was run")

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the lock; the file stays (removing it would race)
            self._fd = None


def _starts_with(path: Path, head: str) -> bool:
    if head == JSONL_RECORD:
        return _first_line_is_record(path)
    try:
        with open(path, "rb") as f:
            return f.read(len(head.encode("utf-8"))) == head.encode("utf-8")
    except OSError:
        return False


def _first_line_is_record(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.loads(f.readline())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(obj, dict) and isinstance(obj.get("key"), str) and "status" in obj
