"""memora.lora.save: name validation, the counter scheme, atomic never-overwriting writes and clean failure."""

from __future__ import annotations

import errno
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from memora.lora import save as S


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {"lora_unet_x.lora_down.weight": torch.randn(4, 8, generator=g),
            "lora_unet_x.lora_up.weight": torch.randn(8, 4, generator=g).t().contiguous().t(),  # non-contiguous
            "lora_unet_x.alpha": torch.tensor(4.0)}


def _tree(root):
    """Every file and folder under root (folders with a trailing '/')."""
    out = []
    for d, dirs, files in os.walk(root):
        out += [os.path.relpath(os.path.join(d, f), root) for f in files]
        out += [os.path.relpath(os.path.join(d, x), root) + "/" for x in dirs]
    return sorted(out)


def test_counter_scheme(tmp_path):
    p1 = S.save_safetensors_atomic(_tensors(), tmp_path, "memora/recovered", {"k": "v"})
    p2 = S.save_safetensors_atomic(_tensors(), tmp_path, "memora/recovered")
    assert p1 == tmp_path / "memora" / "recovered_00001_.safetensors"
    assert p2 == tmp_path / "memora" / "recovered_00002_.safetensors"
    # gaps are not refilled; other prefixes and other extensions do not count
    (tmp_path / "memora" / "recovered_00007_.safetensors").write_bytes(b"x")
    (tmp_path / "memora" / "recovered_more_00050_.safetensors").write_bytes(b"x")
    (tmp_path / "memora" / "recovered_00090_.ckpt").write_bytes(b"x")
    assert S.resolve_save_path(tmp_path, "memora/recovered") == tmp_path / "memora" / "recovered_00008_.safetensors"
    # a trailing .safetensors in the name is not doubled
    assert S.resolve_save_path(tmp_path, "x.safetensors").name == "x_00001_.safetensors"
    assert S.resolve_save_path(tmp_path, " spaced name ").name == "spaced name_00001_.safetensors"


def test_contents_and_metadata_read_back(tmp_path):
    t = _tensors()
    p = S.save_safetensors_atomic(t, tmp_path, "a", {"memora_steps": "500", "note": "ünïcode"})
    back = load_file(str(p))
    assert set(back) == set(t) and all(torch.equal(back[k], t[k]) for k in t)
    with safe_open(str(p), framework="pt") as f:
        assert f.metadata() == {"memora_steps": "500", "note": "ünïcode"}
    with torch.inference_mode():
        inf = {k: v.clone() for k, v in t.items()}
    p2 = S.save_safetensors_atomic(inf, tmp_path, "a")
    assert torch.equal(load_file(str(p2))["lora_unet_x.lora_down.weight"], t["lora_unet_x.lora_down.weight"])


@pytest.mark.parametrize("name, match", [
    ("", "empty"),
    ("   ", "empty"),
    ("../x", r"'\.\.'"),
    ("a/../../b", r"'\.\.'"),
    ("a/./b", r"'\.'"),
    ("/abs/x", "absolute"),
    ("~/x", "absolute"),
    ("C:/x", "absolute"),
    ("a\\b", "backslash"),
    ("a//b", "empty path component"),
    ("a/", "empty path component"),
    (".hidden", "may not start with '.'"),
    ("a/name.", "end with '.'"),
    ("a*b", "not allowed"),
    ("a?b", "not allowed"),
    ("a|b", "not allowed"),
    ("a\x00b", "control"),
    ("a\nb", "control"),
    ("x" * 201, "longer than 200"),
])
def test_bad_names(tmp_path, name, match):
    with pytest.raises(S.SaveNameError, match=match):
        S.resolve_save_path(tmp_path, name)
    with pytest.raises(ValueError, match=match):
        S.save_safetensors_atomic(_tensors(), tmp_path, name)
    assert _tree(tmp_path) == []
    assert not (tmp_path.parent / "x_00001_.safetensors").exists()


def test_bad_inputs_fail_before_writing(tmp_path):
    with pytest.raises(ValueError, match="str -> str"):
        S.save_safetensors_atomic(_tensors(), tmp_path, "sub/a", {"steps": 500})
    with pytest.raises(ValueError, match="empty"):
        S.save_safetensors_atomic({}, tmp_path, "sub/a")
    with pytest.raises(ValueError, match="torch.Tensor"):
        S.save_safetensors_atomic({"a": [1, 2]}, tmp_path, "sub/a")
    assert _tree(tmp_path) == []


def test_folder_blocked_by_a_file(tmp_path):
    (tmp_path / "blocker").write_bytes(b"not a folder")
    for name in ("blocker/x", "blocker/deeper/x"):
        with pytest.raises(S.UnwritableFolderError, match="blocker"):
            S.save_safetensors_atomic(_tensors(), tmp_path, name)
    assert _tree(tmp_path) == ["blocker"]
    assert isinstance(S.UnwritableFolderError(1, "x"), ValueError)


def test_root_is_a_file(tmp_path):
    root = tmp_path / "file_root"
    root.write_bytes(b"x")
    with pytest.raises(S.UnwritableFolderError):
        S.save_safetensors_atomic(_tensors(), root, "memora/x")
    assert _tree(tmp_path) == ["file_root"]


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores file permissions")
def test_read_only_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(S.UnwritableFolderError):
            S.save_safetensors_atomic(_tensors(), ro, "sub/x")
        with pytest.raises(S.UnwritableFolderError):
            S.save_safetensors_atomic(_tensors(), ro, "x")
        assert os.listdir(ro) == []
    finally:
        ro.chmod(0o700)


def test_taken_name_is_never_overwritten(tmp_path, monkeypatch):
    """A concurrent writer takes the resolved name between resolving and publishing: the counter moves on."""
    first = S.save_safetensors_atomic(_tensors(), tmp_path, "r")
    before = first.read_bytes()
    stale = S.resolve_save_path  # always answers the already-taken name, as if resolved before the other write
    monkeypatch.setattr(S, "resolve_save_path", lambda root, name, ext=S.EXT: first)
    p = S.save_safetensors_atomic({"other": torch.zeros(3)}, tmp_path, "r")
    assert p == tmp_path / "r_00002_.safetensors"
    assert first.read_bytes() == before
    monkeypatch.setattr(S, "resolve_save_path", stale)
    assert sorted(os.listdir(tmp_path)) == ["r_00001_.safetensors", "r_00002_.safetensors"]


def test_exact_path_mode_refuses_existing_file(tmp_path):
    p = S.save_safetensors_atomic(_tensors(), tmp_path / "exact.safetensors")
    before = p.read_bytes()
    with pytest.raises(FileExistsError):
        S.save_safetensors_atomic({"other": torch.zeros(3)}, p)
    assert p.read_bytes() == before
    assert os.listdir(tmp_path) == ["exact.safetensors"]


def test_without_hard_links_still_never_overwrites(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    p1 = S.save_safetensors_atomic(_tensors(), tmp_path, "n")
    p2 = S.save_safetensors_atomic(_tensors(), tmp_path, "n")
    assert [p1.name, p2.name] == ["n_00001_.safetensors", "n_00002_.safetensors"]
    assert torch.equal(load_file(str(p2))["lora_unet_x.alpha"], torch.tensor(4.0))
    assert sorted(os.listdir(tmp_path)) == ["n_00001_.safetensors", "n_00002_.safetensors"]


@pytest.mark.parametrize("exc", [KeyboardInterrupt, OSError(errno.ENOSPC, "No space left on device")])
def test_failure_while_writing_leaves_nothing(tmp_path, monkeypatch, exc):
    (tmp_path / "kept").mkdir()

    def failing_fsync(fd):
        raise exc

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(exc if isinstance(exc, type) else type(exc)):
        S.save_safetensors_atomic(_tensors(), tmp_path, "new/deep/x")
    assert _tree(tmp_path) == ["kept/"]  # temp file gone, folders made for it gone, existing folder kept


def test_failure_while_publishing_leaves_nothing(tmp_path, monkeypatch):
    def failing_link(src, dst):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "link", failing_link)
    with pytest.raises(OSError, match="Input/output"):
        S.save_safetensors_atomic(_tensors(), tmp_path, "sub/x")
    assert _tree(tmp_path) == []


def test_saved_name_through_a_symlinked_subfolder(tmp_path):
    """root/link -> elsewhere: a save as 'link/x' is named 'link/x_00001_.safetensors' relative to root (what a
    listing that follows links, like ComfyUI's, shows), not the bare file name or the link's target."""
    root = tmp_path / "loras"
    root.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (root / "link").symlink_to(elsewhere, target_is_directory=True)
    path = S.save_safetensors_atomic(_tensors(), root, "link/x")
    assert S.name_in_root(root, path) == "link/x_00001_.safetensors"
    assert (elsewhere / "x_00001_.safetensors").is_file()
    assert load_file(str(root / S.name_in_root(root, path))).keys() == _tensors().keys()
    deeper = S.save_safetensors_atomic(_tensors(), root, "link/sub/y")
    assert S.name_in_root(root, deeper) == "link/sub/y_00001_.safetensors"
    with pytest.raises(ValueError, match="not a file under"):
        S.name_in_root(root, elsewhere / "x_00001_.safetensors")
