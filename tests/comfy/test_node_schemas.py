"""What ComfyUI sees of the pack's nodes does not change by accident: every MemoRa node's /object_info entry (ids,
display names, categories, descriptions, inputs with types, defaults, ranges and tooltips, outputs, output flags),
computed by the loaded ComfyUI itself, equals the recorded one in tests/comfy/node_schemas/<ComfyUI version>.json.

The records were written from the tree before the node schemas were factored into nodes/_schema.py (commit 9cdf01a),
so this test is the proof that the factoring changed nothing. After a deliberate change to a node's interface,
rewrite the record for each ComfyUI version with MEMORA_WRITE_NODE_SCHEMAS=1 (the test then skips) and review the
diff."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

RECORDS = Path(__file__).resolve().parent / "node_schemas"

# Inputs whose options are the files found in the model folders: they depend on what the tests put there, so they
# are compared with the folder listing of the moment and recorded as a marker.
FILE_LISTS = {("MemoRaLoadLoRA", "lora_name"): "loras", ("MemoRaLoadUnlearnedModel", "ckpt_name"): "checkpoints",
              ("MemoRaLoadUnlearnedModel", "unlearned_weights"): None}
# Inputs whose options the pack finds by scanning model folders itself: recorded as a marker.
SCANNED_LISTS = {("MemoRaObjectScore", "classifier"): "auto + classifiers", ("MemoRaClipScore", "clip_model"):
                 "auto + CLIP folders", ("MemoRaStyleScore", "clip_model"): "auto + CLIP folders",
                 ("MemoRaStyleClassifierScore", "classifier"): "classifier folders"}


def _mask_file_lists(node_type: str, info: dict) -> dict:
    import folder_paths

    for section in ("required", "optional"):
        for name, spec in (info.get("input", {}).get(section) or {}).items():
            if (node_type, name) in SCANNED_LISTS:
                options = spec[0] if isinstance(spec[0], list) else spec[1]["options"]
                options[:] = [f"<{SCANNED_LISTS[(node_type, name)]}>"]
                continue
            if (node_type, name) not in FILE_LISTS:
                continue
            options = spec[0] if isinstance(spec[0], list) else spec[1]["options"]
            folder = FILE_LISTS[(node_type, name)]
            assert isinstance(options, list) and all(isinstance(o, str) for o in options), (node_type, name, spec)
            if folder is not None:
                assert options == folder_paths.get_filename_list(folder), (node_type, name)
            options[:] = [f"<files of {folder or 'the unlearned-weights folders'}>"]
    return info


def pack_object_info() -> dict:
    """node id -> /object_info entry (JSON round-tripped) for every node of the pack, file lists masked."""
    import nodes
    from memora_batch.workflow import node_info_in_process

    out = {}
    for node_type, cls in sorted(nodes.NODE_CLASS_MAPPINGS.items()):
        if not node_type.startswith("MemoRa") or "memora_testkit" in (cls.__module__ or ""):
            continue  # the test kit's helper nodes are not the pack's
        info = json.loads(json.dumps(node_info_in_process(node_type), default=str))
        out[node_type] = _mask_file_lists(node_type, info)
    return out


def test_node_definitions_match_the_record(comfy):
    from comfyui_version import __version__ as version

    record = RECORDS / f"comfyui-{version}.json"
    current = pack_object_info()
    assert len(current) == 26, sorted(current)
    if os.environ.get("MEMORA_WRITE_NODE_SCHEMAS") == "1":
        record.parent.mkdir(exist_ok=True)
        record.write_text(json.dumps(current, indent=1, sort_keys=True) + "\n")
        pytest.skip(f"wrote {record}; review the diff and rerun without MEMORA_WRITE_NODE_SCHEMAS")
    assert record.is_file(), f"no record for ComfyUI {version}: {record} (write it with " \
                             f"MEMORA_WRITE_NODE_SCHEMAS=1 from a tree whose node interfaces are known good)"
    expected = json.loads(record.read_text())
    assert sorted(current) == sorted(expected), "the set of MemoRa nodes changed"
    for node_type in expected:
        got, want = current[node_type], expected[node_type]
        for key in sorted(set(got) | set(want)):
            assert got.get(key) == want.get(key), f"{node_type}: '{key}' differs from the record"
