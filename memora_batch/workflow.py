"""Saved ComfyUI workflows: load UI or API format, check the node types, convert UI -> API, address inputs.

Conversion of the editor's UI format (litegraph ``nodes``/``links``) to the API format that the executor and POST
/prompt take is done by comfy-cli's converter (``comfy_cli.workflow_to_api.convert_ui_to_api``): it maps widget
values stored by position to input names through /object_info-style node definitions (control_after_generate
companions skipped), follows converted widgets, primitive nodes, reroutes, Get/Set nodes and subgraphs, drops notes
and muted nodes and routes links through bypassed ones. What this module adds around it:

- node definitions in /object_info form without a server (:func:`object_info_in_process`, from
  ``nodes.NODE_CLASS_MAPPINGS``), or from a server's GET /object_info;
- a check, before anything runs, that every node type the workflow uses is installed (:class:`MissingNodeTypes`);
- addressing inputs by node title or id (``"Train LoRA.steps"``, ``"12.seed"``), including the title of a legacy
  front-end PrimitiveNode, which disappears in the API graph (its value is copied into every input it feeds);
- the job key: a hash of the resolved API graph.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import math
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Iterable, Optional

from memora.contracts import NODE_LORA_TRAIN

#: Node types that live only in the editor (never sent to the server).
UI_ONLY_TYPES = frozenset({"Note", "MarkdownNote", "PrimitiveNode", "Reroute", "GetNode", "SetNode"})
#: litegraph node modes: 0 always, 2 never (muted), 4 bypass.
MODE_MUTED = 2
MODE_BYPASS = 4


class WorkflowError(ValueError):
    """The workflow file cannot be used as given (unreadable, not a workflow, cannot be converted)."""


class MissingNodeTypes(WorkflowError):
    """The workflow uses node types that are not installed where it would run."""

    def __init__(self, missing: dict[str, list[str]], where: str):
        self.missing = missing
        lines = [f"the workflow uses {len(missing)} node type(s) that are not installed in {where}:"]
        for node_type, ids in sorted(missing.items()):
            lines.append(f"  {node_type}  (node {', '.join(ids)})")
        lines.append("Install the custom node pack that provides them (ComfyUI-Manager or comfy-cli: "
                     "`comfy node install <pack>`), or remove those nodes.")
        super().__init__("\n".join(lines))


class AddressError(ValueError):
    """A sweep column or --set key names no node input of the workflow."""


# -- loading ---------------------------------------------------------------------------------------------------------
def is_api_format(data: Any) -> bool:
    if not isinstance(data, dict) or ("nodes" in data and "links" in data):
        return False
    return bool(data) and all(isinstance(v, dict) and "class_type" in v for v in data.values())


def is_ui_format(data: Any) -> bool:
    return isinstance(data, dict) and isinstance(data.get("nodes"), list) and isinstance(data.get("links"), list)


@dataclass
class Workflow:
    """A saved workflow. ``ui`` is the editor's graph (None for an API-format file); ``api`` is set once converted."""

    name: str
    ui: Optional[dict] = None
    api: Optional[dict] = None
    path: Optional[Path] = None
    #: (title or id of a front-end PrimitiveNode, "value") -> [(api node id, input name)] it feeds.
    aliases: dict = field(default_factory=dict)

    @classmethod
    def load(cls, source: "str | Path | dict", name: Optional[str] = None) -> "Workflow":
        path = None
        if isinstance(source, dict):
            data = source
        else:
            path = Path(source)
            if not path.is_file():
                raise WorkflowError(f"workflow file not found: {path}")
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise WorkflowError(f"{path} is not valid JSON: {e}") from None
        # Some tools wrap the API graph: {"prompt": {...}} (the body of POST /prompt).
        if isinstance(data, dict) and isinstance(data.get("prompt"), dict) and is_api_format(data["prompt"]):
            data = data["prompt"]
        wf_name = name or (path.stem if path else "workflow")
        if is_api_format(data):
            return cls(wf_name, None, copy.deepcopy(data), path)
        if is_ui_format(data):
            return cls(wf_name, copy.deepcopy(data), None, path)
        raise WorkflowError(f"{path or 'the workflow'} is neither a UI-format workflow (the editor's Save: 'nodes' and "
                            f"'links') nor an API-format one (Export (API): {{id: {{class_type, inputs}}}})")

    # -- node types --------------------------------------------------------------------------------------------------
    def required_node_types(self) -> dict[str, list[str]]:
        """Node type -> ids of the nodes that will execute (editor-only, muted and bypassed nodes excluded)."""
        out: dict[str, list[str]] = {}
        if self.ui is None:
            for nid, node in (self.api or {}).items():
                out.setdefault(node["class_type"], []).append(str(nid))
            return out
        subgraph_ids = {sg.get("id") for sg in _subgraph_defs(self.ui)}
        for node in _all_ui_nodes(self.ui):
            node_type = node.get("type")
            if not isinstance(node_type, str) or node_type in UI_ONLY_TYPES or node_type in subgraph_ids:
                continue
            if node.get("mode", 0) in (MODE_MUTED, MODE_BYPASS):
                continue
            out.setdefault(node_type, []).append(str(node.get("id")))
        return out

    def check_installed(self, available: Iterable[str], where: str) -> None:
        available = set(available)
        missing = {t: ids for t, ids in self.required_node_types().items() if t not in available}
        if missing:
            raise MissingNodeTypes(missing, where)

    # -- conversion --------------------------------------------------------------------------------------------------
    def to_api(self, object_info: dict) -> dict:
        """The API-format graph (converted once through ``object_info`` for a UI-format workflow)."""
        if self.api is not None:
            return self.api
        self.check_installed(object_info.keys(), "the node definitions given")
        self.api = convert_ui_to_api(self.ui, object_info)
        self.aliases = _primitive_aliases(self.ui, self.api)
        return self.api


def _subgraph_defs(ui: dict) -> list[dict]:
    defs = (ui.get("definitions") or {}).get("subgraphs") or []
    return [d for d in defs if isinstance(d, dict)]


def _all_ui_nodes(ui: dict) -> list[dict]:
    nodes = [n for n in ui.get("nodes", []) if isinstance(n, dict)]
    for sg in _subgraph_defs(ui):
        nodes.extend(n for n in sg.get("nodes", []) if isinstance(n, dict))
    return nodes


def convert_ui_to_api(ui: dict, object_info: dict) -> dict:
    """UI format -> API format with comfy-cli's converter (install comfy-cli, or the ``batch`` extra, for it)."""
    try:
        from comfy_cli.workflow_to_api import WorkflowConversionError, convert_ui_to_api as _convert
    except ImportError:
        raise WorkflowError(
            "converting a UI-format workflow needs comfy-cli's converter (pip install comfy-cli, or "
            "pip install 'comfyui-memora[batch]'); alternatively save the workflow with the editor's "
            "'Export (API)' and pass that file") from None
    try:
        api = _convert(ui, object_info)
    except WorkflowConversionError as e:
        raise WorkflowError(f"cannot convert the workflow to API format: {e}") from None
    expected = {str(n.get("id")) for n in ui.get("nodes", []) if isinstance(n, dict)
                and n.get("type") not in UI_ONLY_TYPES and n.get("mode", 0) not in (MODE_MUTED, MODE_BYPASS)
                and n.get("type") in object_info}
    lost = sorted(expected - set(api), key=_id_sort_key)
    if lost:
        # comfy-cli logs and skips a node it cannot convert; a silently shorter graph is worse than an error.
        raise WorkflowError(f"cannot convert node(s) {', '.join(lost)} to API format (see the log above)")
    return api


def _id_sort_key(nid: str):
    return (0, int(nid), "") if str(nid).isdigit() else (1, 0, str(nid))


def _primitive_aliases(ui: dict, api: dict) -> dict:
    """Front-end PrimitiveNodes vanish in the API graph: remember which inputs each one fed, by title and id."""
    links = {}
    for link in ui.get("links", []):
        if isinstance(link, list) and len(link) >= 5:
            links[link[0]] = (str(link[1]), str(link[3]), link[4])
        elif isinstance(link, dict):
            links[link.get("id")] = (str(link.get("origin_id")), str(link.get("target_id")), link.get("target_slot"))
    nodes = {str(n.get("id")): n for n in ui.get("nodes", []) if isinstance(n, dict)}
    aliases: dict = {}
    for nid, node in nodes.items():
        if node.get("type") != "PrimitiveNode":
            continue
        targets = []
        pending = [lid for out in node.get("outputs") or [] for lid in (out.get("links") or [])]
        seen = set()
        while pending:
            lid = pending.pop()
            if lid in seen or lid not in links:
                continue
            seen.add(lid)
            _, target_id, target_slot = links[lid]
            target = nodes.get(target_id)
            if target is None:
                continue
            if target.get("type") == "Reroute":
                pending.extend(lid2 for out in target.get("outputs") or [] for lid2 in (out.get("links") or []))
                continue
            inputs = target.get("inputs") or []
            if isinstance(target_slot, int) and 0 <= target_slot < len(inputs):
                name = inputs[target_slot].get("name")
                if target_id in api and name:
                    targets.append((target_id, name))
        if targets:
            for key in {nid, node.get("title") or ""} - {""}:
                aliases.setdefault(key, []).extend(targets)
    return aliases


# -- node definitions -------------------------------------------------------------------------------------------------
def node_info_in_process(node_type: str) -> dict:
    """One node's /object_info entry, computed from the loaded ComfyUI (what the server's GET /object_info returns)."""
    import nodes

    cls = nodes.NODE_CLASS_MAPPINGS[node_type]
    if hasattr(cls, "GET_NODE_INFO_V1"):  # V3 io.ComfyNode
        return cls.GET_NODE_INFO_V1()
    input_types = cls.INPUT_TYPES()
    return {
        "input": input_types,
        "input_order": {section: list(spec.keys()) for section, spec in input_types.items()},
        "output": list(cls.RETURN_TYPES),
        "output_is_list": list(getattr(cls, "OUTPUT_IS_LIST", [False] * len(cls.RETURN_TYPES))),
        "output_name": list(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)),
        "name": node_type,
        "display_name": nodes.NODE_DISPLAY_NAME_MAPPINGS.get(node_type, node_type),
        "description": getattr(cls, "DESCRIPTION", ""),
        "category": getattr(cls, "CATEGORY", "sd"),
        "output_node": bool(getattr(cls, "OUTPUT_NODE", False)),
    }


def object_info_in_process(node_types: Optional[Iterable[str]] = None) -> dict:
    """/object_info for ``node_types`` (default: every installed node) from the ComfyUI loaded in this process."""
    import folder_paths
    import nodes

    wanted = list(nodes.NODE_CLASS_MAPPINGS) if node_types is None else \
        [t for t in node_types if t in nodes.NODE_CLASS_MAPPINGS]
    out = {}
    with folder_paths.cache_helper:
        for node_type in wanted:
            out[node_type] = node_info_in_process(node_type)
    return out


def input_specs(info: dict) -> dict[str, Any]:
    """name -> spec ([type, options]) over required and optional inputs of one /object_info entry."""
    specs: dict[str, Any] = {}
    for section in ("required", "optional"):
        specs.update((info.get("input") or {}).get(section) or {})
    return specs


def input_type(spec: Any) -> Any:
    """'INT', 'FLOAT', 'STRING', 'BOOLEAN', 'COMBO' (with options) or a socket type."""
    if not isinstance(spec, (list, tuple)) or not spec:
        return None
    return "COMBO" if isinstance(spec[0], (list, tuple)) else spec[0]


def combo_options(spec: Any) -> Optional[list]:
    if not isinstance(spec, (list, tuple)) or not spec:
        return None
    if isinstance(spec[0], (list, tuple)):
        return list(spec[0])
    if spec[0] == "COMBO" and len(spec) > 1 and isinstance(spec[1], dict):
        return list(spec[1].get("options") or [])
    return None


# -- addressing inputs ------------------------------------------------------------------------------------------------
def title_of(api: dict, nid: str) -> str:
    return ((api.get(nid) or {}).get("_meta") or {}).get("title") or api.get(nid, {}).get("class_type", nid)


@dataclass(frozen=True)
class Target:
    node_id: str
    input: str


def _node_ids_for(name: str, api: dict, aliases: dict) -> list[str]:
    if name in api:
        return [name]
    return [nid for nid in api if title_of(api, nid) == name]


def first_resolvable(addresses, api: dict, object_info: dict, aliases: Optional[dict] = None) -> Optional[str]:
    """The first of ``addresses`` that names an input of the workflow (see :func:`resolve_address`), else None."""
    for address in addresses:
        try:
            resolve_address(address, api, object_info, aliases)
        except AddressError:
            continue
        return address
    return None


def resolve_address(address: str, api: dict, object_info: dict, aliases: Optional[dict] = None) -> list[Target]:
    """``"<title or id>.<input>"`` -> the inputs it sets. A title shared by several nodes sets all of them.

    Titles may contain dots: every split point is tried, the last that names an existing node input wins. A front-end
    PrimitiveNode is addressed as ``"<its title>.value"`` and sets every input it feeds."""
    aliases = aliases or {}
    parts = address.split(".")
    for i in range(len(parts) - 1, 0, -1):
        name, inp = ".".join(parts[:i]), ".".join(parts[i:])
        if inp == "value" and name in aliases:
            return [Target(nid, name_) for nid, name_ in aliases[name]]
        ids = _node_ids_for(name, api, aliases)
        if not ids:
            continue
        found = []
        for nid in ids:
            node = api[nid]
            known = set(input_specs(object_info.get(node["class_type"], {}))) | set(node.get("inputs", {}))
            if inp in known:
                found.append(Target(nid, inp))
        if found:
            for t in found:
                value = api[t.node_id].get("inputs", {}).get(t.input)
                if _is_link(value):
                    src = str(value[0])
                    raise AddressError(
                        f"{address!r}: input {t.input!r} of node {t.node_id} ({title_of(api, t.node_id)!r}) is "
                        f"connected to node {src} ({title_of(api, src)!r}); set that node's value instead")
            return found
    raise AddressError(f"{address!r} matches no node input of the workflow. "
                       f"{_candidates_hint(address, api, object_info, aliases)}")


def _is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def settable_addresses(api: dict, object_info: dict, aliases: Optional[dict] = None) -> list[str]:
    """Every ``title.input`` a sweep may set (inputs holding values, not links)."""
    out = []
    for nid in sorted(api, key=_id_sort_key):
        node = api[nid]
        names = list(node.get("inputs", {}))
        for n in input_specs(object_info.get(node["class_type"], {})):
            if n not in names:
                names.append(n)
        for n in names:
            spec = input_specs(object_info.get(node["class_type"], {})).get(n)
            if _is_link(node.get("inputs", {}).get(n)):
                continue
            if spec is not None and input_type(spec) not in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"):
                continue
            out.append(f"{title_of(api, nid)}.{n}")
    for key in (aliases or {}):
        if not str(key).isdigit():
            out.append(f"{key}.value")
    return out


def _candidates_hint(address: str, api: dict, object_info: dict, aliases: dict) -> str:
    cands = settable_addresses(api, object_info, aliases)
    close = difflib.get_close_matches(address, cands, n=6, cutoff=0.4)
    head = address.rsplit(".", 1)[0]
    same_node = [c for c in cands if c.startswith(head + ".")]
    shown = list(dict.fromkeys(close + same_node))[:12]
    if not shown:
        titles = sorted({title_of(api, nid) for nid in api})
        return "Address inputs as '<node title or id>.<input name>'; node titles: " + ", ".join(repr(t) for t in titles)
    return "Candidates: " + ", ".join(shown)


def parse_int(value: Any) -> int:
    """An integer exactly as written: 9007199254740993 stays ...993 (never through a float). Accepts ints, integral
    floats and Decimals (JSON numbers), and text: decimal digits (``1_000``), ``1e3``, ``100.0``, ``0x10``.
    ValueError otherwise (booleans, fractions, NaN, infinities, other text)."""
    if isinstance(value, bool):
        raise ValueError("a boolean is not an integer")
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise ValueError(f"{value!r} is not an integer")
        return int(value)
    text = str(value).strip()
    try:
        return int(text, 10)
    except ValueError:
        pass
    try:
        d = value if isinstance(value, Decimal) else Decimal(text)
    except (InvalidOperation, ValueError):
        d = None
    if d is not None:
        if not d.is_finite() or d.adjusted() > 40 or d != d.to_integral_value():
            raise ValueError(f"{text!r} is not an integer (or has more than 40 digits)")
        return int(d)
    return int(text, 0)  # 0x10, 0o17, 0b101; ValueError for anything else


def parse_float(value: Any) -> float:
    """A finite float (ValueError for NaN, infinities, booleans and text that is no number)."""
    if isinstance(value, bool):
        raise ValueError("a boolean is not a number")
    f = float(value if isinstance(value, (int, float, Decimal)) else str(value).strip())
    if not math.isfinite(f):
        raise ValueError(f"{value!r} is not a finite number")
    return f


def coerce_value(value: Any, spec: Any, address: str) -> Any:
    """A sweep cell (often a string from CSV) -> the input's type, or a specific error. Integers are parsed exactly,
    floats must be finite, text stays the text that was written."""
    kind = input_type(spec)
    if value is None:
        raise AddressError(f"{address}: empty value")
    try:
        if kind == "INT":
            return parse_int(value)
        if kind == "FLOAT":
            return parse_float(value)
        if kind == "BOOLEAN":
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in ("true", "1", "yes", "on"):
                return True
            if s in ("false", "0", "no", "off"):
                return False
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        expected = {"INT": "an integer", "FLOAT": "a finite number", "BOOLEAN": "true or false"}[kind]
        raise AddressError(f"{address}: {value!r} is not a valid {kind} (expected {expected})") from None
    if kind == "COMBO":
        options = combo_options(spec) or []
        if options and value not in options and str(value) in [str(o) for o in options]:
            value = next(o for o in options if str(o) == str(value))
        return value
    if kind == "STRING":
        return value if isinstance(value, str) else str(value)
    return _plain(value, address)


def _plain(value: Any, address: str) -> Any:
    """A value for an input without a known type: JSON numbers as floats, never NaN or an infinity."""
    if isinstance(value, Decimal):
        value = float(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise AddressError(f"{address}: {value!r} is not a finite number")
    return value


def fitted_value(value: Any, spec: Any, address: str) -> Any:
    """``value`` coerced to the input's type and checked against its range (min/max) and options (a combo's),
    or AddressError saying what was expected. An input without a spec takes the value as it is."""
    if not spec:
        return _plain(value, address)
    v = coerce_value(value, spec, address)
    kind = input_type(spec)
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if kind in ("INT", "FLOAT"):
        lo, hi = opts.get("min"), opts.get("max")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise AddressError(f"{address}: {v!r} is outside the input's range {lo}..{hi}")
    if kind == "COMBO":
        options = combo_options(spec) or []
        if options and v not in options:
            shown = ", ".join(repr(o) for o in options[:8]) + (f", ... ({len(options)} in all)" if len(options) > 8 else "")
            raise AddressError(f"{address}: {v!r} is not one of the input's options ({shown})")
    return v


def apply_overrides(api: dict, overrides: dict[str, Any], object_info: dict, aliases: Optional[dict] = None) -> dict:
    """A copy of ``api`` with ``{address: value}`` set (values coerced to each input's type and checked against
    its range and options: AddressError otherwise)."""
    out = copy.deepcopy(api)
    errors = []
    for address, value in overrides.items():
        try:
            for t in resolve_address(address, out, object_info, aliases):
                spec = input_specs(object_info.get(out[t.node_id]["class_type"], {})).get(t.input)
                out[t.node_id].setdefault("inputs", {})[t.input] = fitted_value(value, spec, address)
        except AddressError as e:
            errors.append(str(e))  # every bad value of the row, not only the first
    if errors:
        raise AddressError("\n".join(errors))
    return out


# -- checking a resolved graph before it runs -------------------------------------------------------------------------
#: a combo value ComfyUI resolves itself (an annotated file name: ``"x.png [output]"``): not among the listed options
_ANNOTATED = (" [output]", " [input]", " [temp]")


def graph_problems(api: dict, object_info: dict) -> list[str]:
    """What ComfyUI would refuse in a resolved API graph, found before anything runs: nodes without a type, links
    to missing nodes or outputs, required inputs that are missing, values outside their input's type, range or
    options (NaN and infinities included), and a graph without an output node. [] when the graph is sound."""
    problems: list[str] = []
    has_output = False
    for nid in sorted(api, key=_id_sort_key):
        node = api[nid]
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str):
            problems.append(f"node {nid}: not a node (expected {{'class_type': ..., 'inputs': {{...}}}})")
            continue
        inputs = node.get("inputs", {})
        where = f"node {nid} ({title_of(api, nid)!r}, {node['class_type']})"
        if not isinstance(inputs, dict):
            problems.append(f"{where}: 'inputs' is {type(inputs).__name__}, expected a mapping")
            continue
        info = object_info.get(node["class_type"]) or {}
        has_output = has_output or bool(info.get("output_node"))
        required = (info.get("input") or {}).get("required") or {}
        problems += [f"{where}: required input {name!r} is missing" for name in required if name not in inputs]
        specs = input_specs(info)
        for name, value in inputs.items():
            if isinstance(value, list):
                problems += _link_problems(api, object_info, where, name, value)
                continue
            spec = specs.get(name)
            if input_type(spec) == "COMBO" and isinstance(value, str) and value.endswith(_ANNOTATED):
                continue
            if input_type(spec) == "INT" and isinstance(value, float) and math.isfinite(value):
                value = int(value)  # ComfyUI's validation truncates a workflow's fractional INT; so does the check
            try:
                fitted_value(value, spec, f"{where}: input {name!r}")
            except AddressError as e:
                problems.append(str(e))
    if api and object_info and not has_output:
        problems.append("the graph has no output node (nothing would be saved or shown)")
    return problems


def _link_problems(api: dict, object_info: dict, where: str, name: str, link: list) -> list[str]:
    if len(link) != 2 or not isinstance(link[1], int) or isinstance(link[1], bool):
        return [f"{where}: input {name!r} = {link!r} is not a link ([node id, output index])"]
    src = str(link[0])
    if src not in api or not isinstance(api[src], dict):
        return [f"{where}: input {name!r} is linked to node {src}, which is not in the graph"]
    outputs = (object_info.get(api[src].get("class_type")) or {}).get("output")
    if outputs is not None and not 0 <= link[1] < len(outputs):
        return [f"{where}: input {name!r} is linked to output {link[1]} of node {src}, which has "
                f"{len(outputs)} output(s)"]
    return []


# -- job identity -----------------------------------------------------------------------------------------------------
def graph_key(api: dict) -> str:
    """A stable hash of what a graph computes (titles and other editor metadata excluded)."""
    canon = {nid: {"class_type": n["class_type"], "inputs": n.get("inputs", {})} for nid, n in api.items()}
    blob = json.dumps(canon, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


# -- small, fast runs -------------------------------------------------------------------------------------------------
def quick_settings(api: dict, object_info: dict, steps: int = 2, size: int = 64, train_steps: int = 2) -> dict:
    """A copy of ``api`` scaled down for a smoke run: every sampling/inversion ``steps`` <= ``steps`` (keeping
    start_at_step below it), LoRA training <= ``train_steps`` updates, images ``size`` px, slerp intervals 2."""
    out = copy.deepcopy(api)
    for node in out.values():
        inputs = node.get("inputs", {})
        specs = input_specs(object_info.get(node["class_type"], {}))

        def num(name):
            v = inputs.get(name)
            return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None

        is_training = node["class_type"] == NODE_LORA_TRAIN or "gradient_accumulation" in specs
        if num("steps") is not None:
            new = min(inputs["steps"], train_steps if is_training else steps)
            inputs["steps"] = new
            if num("start_at_step") is not None:
                inputs["start_at_step"] = min(inputs["start_at_step"], max(new - 1, 0))
            if num("end_at_step") is not None and inputs["end_at_step"] < 1000:
                inputs["end_at_step"] = min(inputs["end_at_step"], new)
        if is_training and num("gradient_accumulation") is not None:
            inputs["gradient_accumulation"] = 1
        for name in ("width", "height"):
            if num(name) is not None and input_type(specs.get(name)) == "INT":
                inputs[name] = min(inputs[name], size)
        if num("intervals") is not None:
            inputs["intervals"] = min(inputs["intervals"], 2)
    return out
