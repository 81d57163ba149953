"""Safe saving of LoRA files: validated names, a counter that never reuses a name, atomic writes.

Naming scheme: ``<root>/<save_name>_<counter:05d>_.safetensors`` (ComfyUI's own SaveLoRA / SaveImage spelling), where
``save_name`` may contain subfolders (``memora/recovered`` -> ``<root>/memora/recovered_00001_.safetensors``) and the
counter is one more than the largest counter already used by a file of that name in that folder (gaps are not
refilled, so a deleted file's name is not handed out again while later ones exist).

Guarantees of :func:`save_safetensors_atomic` are those of the pack's one writer, ``memora.fileio`` (see its
docstring): the file appears complete or not at all; an existing file is never overwritten, even by a concurrent
writer (the counter moves on); on any failure, KeyboardInterrupt included, the temporary file and any folder created
for it are removed. Torch + safetensors only: no ComfyUI import."""

from __future__ import annotations

import errno
import os
import re
import unicodedata
from pathlib import Path
from typing import Mapping

import torch

from memora import fileio

EXT = ".safetensors"
_COUNTER_DIGITS = 5
# One path component: letters/digits of any script, and - _ . space + ( ) [ ] , @ =
_COMPONENT_RE = re.compile(r"^[\w\-. +()\[\],@=]+$", re.UNICODE)


class SaveNameError(ValueError):
    """A save_name that is empty, absolute, escapes the target folder or contains characters not allowed."""


UnwritableFolderError = fileio.UnwritableFolderError


def check_save_name(save_name: str, ext: str = EXT) -> tuple[list[str], str]:
    """Validate a save_name; return (subfolder components, base name). Raises SaveNameError saying what was wrong."""
    if not isinstance(save_name, str):
        raise SaveNameError(f"save_name must be a string, got {type(save_name).__name__}")
    name = save_name.strip()
    if not name:
        raise SaveNameError("save_name is empty; expected a file prefix such as 'memora/recovered'")
    if name.startswith(("/", "\\", "~")) or re.match(r"^[A-Za-z]:", name) or os.path.isabs(name):
        raise SaveNameError(f"save_name {save_name!r} is an absolute path (or names a drive); expected a path relative to the "
                            f"target folder such as 'memora/recovered'")
    if "\\" in name:
        raise SaveNameError(f"save_name {save_name!r} contains a backslash; use '/' to separate subfolders")
    if ext and name.lower().endswith(ext.lower()):
        name = name[: -len(ext)]
    parts = name.split("/")
    for p in parts:
        if p in ("..", "."):
            raise SaveNameError(f"save_name {save_name!r} contains {p!r}: names may not leave or refer to the "
                                f"folder itself; expected e.g. 'memora/recovered'")
        if not p:
            raise SaveNameError(f"save_name {save_name!r} has an empty path component ('//' or a trailing '/'); "
                                f"expected e.g. 'memora/recovered'")
        if any(unicodedata.category(c).startswith("C") for c in p):
            raise SaveNameError(f"save_name {save_name!r} contains control or invisible characters")
        if not _COMPONENT_RE.match(p):
            bad = sorted({c for c in p if not _COMPONENT_RE.match(c)})
            raise SaveNameError(f"save_name {save_name!r} contains characters not allowed in file names: {bad}; "
                                f"allowed are letters, digits, space and - _ . + ( ) [ ] , @ =, with '/' between "
                                f"subfolders")
        if p.startswith(".") or p.endswith((".", " ")) or p.startswith(" "):
            raise SaveNameError(f"save_name {save_name!r}: component {p!r} may not start with '.' or a space or "
                                f"end with '.' or a space")
        if len(p.encode()) > 200:
            raise SaveNameError(f"save_name {save_name!r}: component {p[:20]!r}... is longer than 200 bytes")
    return parts[:-1], parts[-1]


def _next_counter(folder: Path, base: str, ext: str) -> int:
    pattern = re.compile(re.escape(base) + r"_(\d{%d,})_" % _COUNTER_DIGITS + re.escape(ext) + "$")
    highest = 0
    try:
        entries = os.listdir(folder)
    except FileNotFoundError:
        return 1
    except OSError as e:  # a file where a folder should be, no permission to list
        raise UnwritableFolderError(e.errno or errno.EIO, f"cannot save into folder {folder}: {e.strerror or e}") from e
    for entry in entries:
        m = pattern.match(entry)
        if m:
            highest = max(highest, int(m.group(1)))
    return highest + 1


def _file_name(base: str, counter: int, ext: str) -> str:
    return f"{base}_{counter:0{_COUNTER_DIGITS}d}_{ext}"


def resolve_save_path(root: str | os.PathLike, save_name: str, ext: str = EXT) -> Path:
    """The next free path ``<root>/<save_name>_<counter:05d>_<ext>`` (see the module docstring). Validates the name
    (SaveNameError) and that the result stays inside root; creates nothing. The name may be taken by the time it is
    written: :func:`save_safetensors_atomic` then moves on to the next counter."""
    subdirs, base = check_save_name(save_name, ext)
    root_abs = Path(os.path.abspath(os.fspath(root)))
    folder = Path(os.path.normpath(os.path.join(root_abs, *subdirs)))
    if os.path.commonpath([root_abs, folder]) != str(root_abs):
        raise SaveNameError(f"save_name {save_name!r} leaves the target folder {root_abs}")
    return folder / _file_name(base, _next_counter(folder, base, ext), ext)


def _check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise ValueError(f"metadata must be a dict of str -> str, got {type(metadata).__name__}")
    bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise ValueError(f"safetensors metadata must map str -> str; these entries do not: {bad[:5]} "
                         f"(json.dumps structured values first)")
    return dict(metadata)


def _serialise(tensors: Mapping[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    from safetensors.torch import save

    if not isinstance(tensors, Mapping) or not tensors:
        raise ValueError("nothing to save: the tensor dict is empty")
    bad = [k for k, v in tensors.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"tensors must map str -> torch.Tensor; these entries do not: {bad[:5]}")
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    return _canonical_header(save(flat, metadata=metadata or None))


def _canonical_header(data: bytes) -> bytes:
    """The same safetensors file with its JSON header written with sorted keys: safetensors writes the metadata in
    hash-map order, which changes from call to call, so equal tensors and metadata would give different bytes.
    Tensor data and offsets are unchanged (the header stays padded to a multiple of 8 bytes)."""
    import json

    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + n:]


def save_safetensors_atomic(tensors: Mapping[str, torch.Tensor], path_or_root: str | os.PathLike,
                            save_name: str | None = None, metadata: Mapping[str, str] | None = None,
                            ext: str = EXT) -> Path:
    """Write ``tensors`` (+ str metadata) as safetensors; return the final path.

    With ``save_name``: ``path_or_root`` is the root folder and the file is ``resolve_save_path(root, save_name)``
    (the counter moves on if a concurrent writer takes the name). Without: ``path_or_root`` is the exact file path,
    which must not exist (FileExistsError). Bad names: SaveNameError; folder not creatable or not writable:
    UnwritableFolderError (both ValueErrors). Nothing is left behind on failure."""
    meta = _check_metadata(metadata)
    data = _serialise(tensors, meta)
    if save_name is None:
        return fileio.atomic_write(path_or_root, data, replace=False)
    target = resolve_save_path(path_or_root, save_name, ext)
    _subdirs, base = check_save_name(save_name, ext)
    return fileio.write_numbered(target.parent, lambda n: _file_name(base, n, ext),
                                 _next_counter(target.parent, base, ext), data)


def name_in_root(root: str | os.PathLike, path: str | os.PathLike) -> str:
    """A saved file's name relative to the root it was saved under, '/'-separated, with symlinked subfolders kept
    as named (``link/x_00001_.safetensors`` for a save through ``<root>/link -> elsewhere``, as folder listings that
    follow links show it). Lexical: nothing is resolved. ValueError when ``path`` is not under ``root``."""
    root_abs = os.path.abspath(os.fspath(root))
    p = os.path.abspath(os.fspath(path))
    if os.path.commonpath([root_abs, p]) != root_abs or p == root_abs:
        raise ValueError(f"{p} is not a file under {root_abs}")
    return Path(os.path.relpath(p, root_abs)).as_posix()


def check_save_target(root: str | os.PathLike, save_name: str, ext: str = EXT) -> Path:
    """Validate ``save_name`` against ``root`` and that the folder it names can be written, creating nothing.
    Returns the path the file would get now (the final name may move on if it is taken meanwhile). SaveNameError
    or UnwritableFolderError (both ValueErrors) saying what is wrong."""
    path = resolve_save_path(root, save_name, ext)
    probe = path.parent
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise UnwritableFolderError(errno.ENOTDIR, f"cannot save {save_name!r}: {probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UnwritableFolderError(errno.EACCES, f"cannot save {save_name!r}: folder {probe} is not writable")
    return path
