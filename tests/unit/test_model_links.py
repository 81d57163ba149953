"""The templates' download entries (`properties.models` on loader nodes: name, url, directory, as ComfyUI's editor
reads them to offer missing models) agree with docs/models.md, and each names the file its loader widget shows."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "models.md"
TEMPLATES = sorted((ROOT / "example_workflows").glob("*.json"))
#: loader widget that names the file, per loader type and folder ("<folder>/<file>" for the unlearned loader)
ROW = re.compile(r"^\| `(?P<name>[^`]+)` \| `models/(?P<directory>[^`]+)` \| (?P<url>https://\S+) \|", re.M)


def documented() -> dict[str, tuple[str, str]]:
    text = DOC.read_text()
    section = text.split("## Files the templates name", 1)[1].split("\n## ", 1)[0]
    rows = {m["name"]: (m["directory"], m["url"]) for m in ROW.finditer(section)}
    assert rows, "docs/models.md: no rows in 'Files the templates name'"
    return rows


def entries():
    for path in TEMPLATES:
        for node in json.loads(path.read_text())["nodes"]:
            for entry in (node.get("properties") or {}).get("models") or []:
                yield path.name, node, entry


def test_every_template_entry_is_documented_with_its_folder_and_url():
    rows = documented()
    seen = set()
    for template, node, entry in entries():
        assert set(entry) == {"name", "url", "directory"}, (template, entry)
        where = f"{template}: {node.get('title')}: {entry['name']}"
        assert entry["name"] in rows, f"{where} is not in docs/models.md's table"
        assert (entry["directory"], entry["url"]) == rows[entry["name"]], \
            f"{where}: {entry['directory']} {entry['url']} != docs/models.md {rows[entry['name']]}"
        assert entry["url"].startswith("https://huggingface.co/") and entry["url"].endswith("/" + entry["name"]), where
        seen.add(entry["name"])
    # the shipped SD1.x and SDXL templates name SD 1.4, SDXL base and one public unlearned model
    assert {"sd-v1-4.ckpt", "sd_xl_base_1.0.safetensors", "UCE-Nudity-Diffusers-UNet.pt"} <= seen, seen
    assert seen == set(rows), f"documented but named by no template: {sorted(set(rows) - seen)}"


def test_the_workflow_lists_every_loader_entry_at_the_top_level_too():
    """The editor offers a node's entry only where a widget shows that exact name (MemoRa Load Unlearned Model shows
    'unlearned/<file>'), but offers every entry of the workflow's top-level `models` list: it holds them all."""
    rows = documented()
    for path in TEMPLATES:
        ui = json.loads(path.read_text())
        nodes = {e["url"]: e for _t, _n, e in entries() if _t == path.name}
        assert {m["url"]: m for m in ui.get("models", [])} == nodes, path.name
        for m in ui.get("models", []):
            assert (m["directory"], m["url"]) == rows[m["name"]], (path.name, m)


def test_each_entry_names_the_file_its_loader_shows():
    for template, node, entry in entries():
        values = node.get("widgets_values") or []
        shown = {f"{entry['directory']}/{entry['name']}" if node["type"] == "MemoRaLoadUnlearnedModel"
                 and entry["directory"] != "checkpoints" else entry["name"]}
        assert shown & set(map(str, values)), f"{template}: {node.get('title')} shows {values}, not {shown}"


def test_every_template_loads_the_unlearned_model_through_the_unlearned_loader():
    for path in TEMPLATES:
        nodes = json.loads(path.read_text())["nodes"]
        loaders = [n["type"] for n in nodes if n.get("title") == "Unlearned model"]
        expected = "MemoRaLoadMicroWorld" if path.stem.endswith("_micro") else "MemoRaLoadUnlearnedModel"
        assert loaders == [expected], f"{path.name}: 'Unlearned model' is {loaders}"
