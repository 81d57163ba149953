"""The pack's one atomic file writer (LoRA files, score records, results tables, the micro world's build outputs).

Guarantees: a file appears complete or not at all (written to a temporary file in the same folder, flushed and
fsync'ed, then given its final name); with ``replace=False`` an existing file is never overwritten, even by a
concurrent writer (the final name is taken with a hard link, or an exclusive create where the filesystem has no hard
links); on any failure, KeyboardInterrupt and other BaseExceptions included, the temporary file and every folder
created for it are removed. Files are created with mode 0o666 less the process umask, as ``open()`` would.
Standard library only."""

from __future__ import annotations

import errno
import os
import secrets
from pathlib import Path
from typing import Callable, Union

TMP_PREFIX = ".memora-tmp-"

Data = Union[bytes, bytearray, memoryview, str]


class UnwritableFolderError(OSError, ValueError):
    """The target folder cannot be created or written (permissions, a file in the way, read-only filesystem)."""


def make_folder(folder: Path) -> list[Path]:
    """mkdir -p that returns the folders it created (to remove them on failure); UnwritableFolderError on failure."""
    folder = Path(folder)
    created: list[Path] = []
    missing = []
    p = folder
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    try:
        for d in reversed(missing):
            os.mkdir(d)
            created.append(d)
    except OSError as e:
        remove_folders(created)
        raise UnwritableFolderError(e.errno or errno.EIO, f"cannot create folder {folder}: {e.strerror or e}") from e
    if not folder.is_dir():
        raise UnwritableFolderError(errno.ENOTDIR, f"cannot save into {folder}: it is not a folder")
    return created


def remove_folders(created: list[Path]) -> None:
    for d in reversed(created):
        try:
            os.rmdir(d)
        except OSError:
            pass


def _publish(tmp: Path, final: Path) -> bool:
    """Give the finished temporary file its final name without ever replacing a file; False if the name is taken."""
    try:
        os.link(tmp, final)
        return True
    except FileExistsError:
        return False
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
    # No hard links on this filesystem: reserve the name exclusively, then replace our own empty reservation.
    try:
        fd = os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
        return False
    os.close(fd)
    try:
        os.replace(tmp, final)
    except BaseException:
        os.unlink(final)
        raise
    return True


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_temp(folder: Path, data: Data, suffix: str) -> Path:
    tmp = folder / f"{TMP_PREFIX}{secrets.token_hex(8)}{suffix}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:
        raise UnwritableFolderError(e.errno or errno.EACCES, f"cannot write into folder {folder}: {e.strerror or e}") from e
    try:
        try:
            view = memoryview(data.encode("utf-8") if isinstance(data, str) else data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def write_numbered(folder: str | os.PathLike, name_for: Callable[[int], str], first: int, data: Data) -> Path:
    """Write ``data`` to ``folder/name_for(n)`` for the first n >= ``first`` whose name is free at the moment of
    publishing (a concurrent writer that takes a name moves the counter on). Never overwrites; returns the path."""
    return _write(Path(os.path.abspath(os.fspath(folder))), name_for, first, data, replace=False)


def atomic_write(path: str | os.PathLike, data: Data, *, replace: bool = False) -> Path:
    """Write ``data`` (bytes, or str as UTF-8) to ``path`` atomically. ``replace=False``: FileExistsError if the file
    exists (checked at publishing, so a concurrent writer cannot be overwritten either); ``replace=True``: the old
    file is swapped for the new one in one rename. Returns the path."""
    target = Path(os.path.abspath(os.fspath(path)))
    return _write(target.parent, lambda _n: target.name, 0, data, replace=replace)


def _write(folder: Path, name_for: Callable[[int], str], first: int, data: Data, *, replace: bool) -> Path:
    if not replace and first == 0 and (folder / name_for(0)).exists():
        raise FileExistsError(errno.EEXIST, f"refusing to overwrite existing file {folder / name_for(0)}")
    created = make_folder(folder)
    published = False
    tmp = None
    try:
        tmp = _write_temp(folder, data, os.path.splitext(name_for(first))[1] + ".tmp")
        if replace:
            target = folder / name_for(first)
            os.replace(tmp, target)
            published = True
        else:
            n = first
            for _ in range(100000):
                target = folder / name_for(n)
                if _publish(tmp, target):
                    published = True
                    break
                if first == 0 and name_for(1) == name_for(0):
                    raise FileExistsError(errno.EEXIST, f"refusing to overwrite existing file {target}")
                n += 1
            else:
                raise FileExistsError(errno.EEXIST, f"could not find a free file name in {folder}")
        fsync_dir(folder)
        return target
    finally:
        # on success the temporary name goes (the final hard link stays); on any failure, BaseException included,
        # the temporary file and the folders made for it go too
        if tmp is not None and not (replace and published):
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        if not published:
            remove_folders(created)
