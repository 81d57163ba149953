"""Build UI-format (editor) workflows from node definitions, so widget values land in the right positions.

The editor stores a node's widget values as a list in the order of its widget inputs (required, then optional), with
an extra "control after generate" entry after seed-like INT widgets; a widget driven by a link is listed in the
node's ``inputs`` with a ``widget`` entry and keeps its value in the list. Writing that by hand breaks as soon as a
node gains an input; :class:`UIGraph` derives it from /object_info-style definitions instead
(``scripts/make_workflows.py`` builds the shipped example workflows with it)."""

from __future__ import annotations

import uuid
from typing import Any, Optional, Union

from memora_batch.workflow import input_specs, input_type

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


def is_widget(spec: Any) -> bool:
    if not isinstance(spec, (list, tuple)) or not spec:
        return False
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if opts.get("forceInput") or opts.get("defaultInput"):
        return False
    return input_type(spec) in WIDGET_TYPES


def has_control_widget(name: str, spec: Any) -> bool:
    """The editor adds a 'control after generate' widget (mirrors the front end's rule)."""
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if opts.get("control_after_generate") is not None:
        return bool(opts["control_after_generate"])
    return input_type(spec) == "INT" and name in ("seed", "noise_seed")


def default_of(spec: Any) -> Any:
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if "default" in opts:
        return opts["default"]
    if isinstance(spec[0], (list, tuple)):
        return spec[0][0] if spec[0] else ""
    if spec[0] == "COMBO":
        options = opts.get("options") or []
        return options[0] if options else ""
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(spec[0])


class UINode:
    def __init__(self, graph: "UIGraph", nid: int, node_type: str, info: Optional[dict]):
        self.graph, self.id, self.type, self.info = graph, nid, node_type, info or {}
        self.data: dict = {}

    def __getitem__(self, slot: Union[int, str]) -> tuple["UINode", int]:
        return (self, self.graph.output_slot(self, slot))


class UIGraph:
    def __init__(self, object_info: dict):
        self.object_info = object_info
        self.nodes: list[dict] = []
        self.links: list[list] = []
        self.groups: list[dict] = []
        self._nodes: dict[int, UINode] = {}

    # -- nodes ---------------------------------------------------------------------------------------------------
    def add(self, node_type: str, title: Optional[str] = None, pos=(0, 0), size=None, mode: int = 0,
            color: Optional[str] = None, bgcolor: Optional[str] = None, values: Optional[dict] = None,
            **widget_values) -> UINode:
        """A node with widget values by input name (keywords, or ``values`` for inputs named like a parameter
        here, e.g. an input called 'title')."""
        values = {**widget_values, **(values or {})}
        if node_type not in self.object_info:
            raise KeyError(f"no node definition for {node_type!r}")
        info = self.object_info[node_type]
        nid = len(self.nodes) + 1
        node = UINode(self, nid, node_type, info)
        specs = input_specs(info)
        order = [n for section in ("required", "optional")
                 for n in ((info.get("input_order") or {}).get(section)
                           or list(((info.get("input") or {}).get(section) or {}).keys()))]
        unknown = set(values) - set(specs)
        if unknown:
            raise KeyError(f"{node_type} has no input(s) {sorted(unknown)}; inputs: {order}")
        inputs, widgets = [], []
        for name in order:
            spec = specs[name]
            if is_widget(spec):
                widgets.append(values.get(name, default_of(spec)))
                if has_control_widget(name, spec):
                    widgets.append("fixed")
            else:
                inputs.append({"name": name, "type": input_type(spec) if isinstance(spec[0], str) else "COMBO",
                               "link": None})
        outputs = []
        for i, (otype, oname) in enumerate(zip(info.get("output") or [], info.get("output_name") or [])):
            outputs.append({"name": oname, "type": otype if isinstance(otype, str) else "COMBO", "links": [],
                            "slot_index": i})
        n_rows = max(len(inputs), len(outputs)) + len(widgets)
        multiline = sum(1 for n in order if is_widget(specs[n]) and input_type(specs[n]) == "STRING"
                        and isinstance(specs[n][1] if len(specs[n]) > 1 else None, dict)
                        and specs[n][1].get("multiline"))
        data = {
            "id": nid, "type": node_type, "pos": [float(pos[0]), float(pos[1])],
            "size": list(size) if size else [320.0, float(46 + 24 * n_rows + 70 * multiline)],
            "flags": {}, "order": nid - 1, "mode": mode, "inputs": inputs, "outputs": outputs,
            "properties": {"Node name for S&R": node_type}, "widgets_values": widgets,
        }
        if title:
            data["title"] = title
        if color:
            data["color"] = color
        if bgcolor:
            data["bgcolor"] = bgcolor
        node.data = data
        self.nodes.append(data)
        self._nodes[nid] = node
        return node

    def note(self, text: str, title: str = "Note", pos=(0, 0), size=(400, 200), markdown: bool = False) -> dict:
        nid = len(self.nodes) + 1
        data = {"id": nid, "type": "MarkdownNote" if markdown else "Note", "pos": [float(pos[0]), float(pos[1])],
                "size": [float(size[0]), float(size[1])], "flags": {}, "order": nid - 1, "mode": 0, "inputs": [],
                "outputs": [], "title": title, "properties": {}, "widgets_values": [text],
                "color": "#432", "bgcolor": "#653"}
        self.nodes.append(data)
        return data

    def reroute(self, source: tuple[UINode, int], pos=(0, 0)) -> UINode:
        """A legacy Reroute node passing ``source`` through (an editor-only node)."""
        nid = len(self.nodes) + 1
        node = UINode(self, nid, "Reroute", None)
        otype = source[0].data["outputs"][source[1]]["type"]
        node.data = {"id": nid, "type": "Reroute", "pos": [float(pos[0]), float(pos[1])], "size": [75.0, 26.0],
                     "flags": {}, "order": nid - 1, "mode": 0,
                     "inputs": [{"name": "", "type": "*", "link": None}],
                     "outputs": [{"name": "", "type": otype, "links": [], "slot_index": 0}],
                     "properties": {"showOutputText": False, "horizontal": False}}
        self.nodes.append(node.data)
        self._nodes[nid] = node
        self._link(source, node, 0, otype)
        return node

    def primitive(self, value: Any, title: str, target: tuple[UINode, str], pos=(0, 0)) -> UINode:
        """A legacy front-end PrimitiveNode holding ``value``, feeding the widget ``target`` = (node, input)."""
        dst, name = target
        spec = input_specs(dst.info)[name]
        otype = input_type(spec) if isinstance(spec[0], str) else "COMBO"
        nid = len(self.nodes) + 1
        node = UINode(self, nid, "PrimitiveNode", None)
        widgets = [value] + (["fixed"] if has_control_widget(name, spec) else [])
        node.data = {"id": nid, "type": "PrimitiveNode", "pos": [float(pos[0]), float(pos[1])],
                     "size": [300.0, 82.0], "flags": {}, "order": nid - 1, "mode": 0, "inputs": [],
                     "outputs": [{"name": "connect to widget input", "type": otype, "links": [], "slot_index": 0,
                                  "widget": {"name": name}}],
                     "title": title, "properties": {"Run widget replace on values": False},
                     "widgets_values": widgets}
        self.nodes.append(node.data)
        self._nodes[nid] = node
        self.connect((node, 0), dst, name)
        self.set_widget(dst, name, value)  # the editor keeps the target widget in sync with its primitive
        return node

    def widget_index(self, node: UINode, name: str) -> int:
        """Position of widget ``name`` in the node's widgets_values (control companions counted)."""
        info = node.info
        specs = input_specs(info)
        i = 0
        for section in ("required", "optional"):
            for n in ((info.get("input_order") or {}).get(section) or list(((info.get("input") or {}).get(section)
                                                                             or {}).keys())):
                if not is_widget(specs[n]):
                    continue
                if n == name:
                    return i
                i += 2 if has_control_widget(n, specs[n]) else 1
        raise KeyError(f"{node.type} has no widget {name!r}")

    def set_widget(self, node: UINode, name: str, value: Any) -> None:
        node.data["widgets_values"][self.widget_index(node, name)] = value

    # -- links ---------------------------------------------------------------------------------------------------
    def output_slot(self, node: UINode, slot: Union[int, str]) -> int:
        if isinstance(slot, int):
            return slot
        names = [o["name"] for o in node.data["outputs"]]
        types = [o["type"] for o in node.data["outputs"]]
        if slot in names:
            return names.index(slot)
        if slot in types:
            return types.index(slot)
        raise KeyError(f"{node.type} has no output {slot!r}; outputs: {names}")

    def connect(self, source: tuple[UINode, int], dst: UINode, input_name: str) -> int:
        src, slot = source
        otype = src.data["outputs"][slot]["type"]
        inputs = dst.data["inputs"]
        idx = next((i for i, inp in enumerate(inputs) if inp["name"] == input_name), None)
        if idx is None:
            spec = input_specs(dst.info).get(input_name)
            if spec is None or not is_widget(spec):
                raise KeyError(f"{dst.type} has no input {input_name!r}")
            # a widget turned into an input socket ("converted widget"): the value stays in widgets_values
            inputs.append({"name": input_name, "type": otype, "widget": {"name": input_name}, "link": None})
            idx = len(inputs) - 1
        return self._link(source, dst, idx, otype)

    def _link(self, source: tuple[UINode, int], dst: UINode, dst_slot: int, otype: str) -> int:
        src, slot = source
        lid = len(self.links) + 1
        self.links.append([lid, src.id, slot, dst.id, dst_slot, otype])
        src.data["outputs"][slot]["links"].append(lid)
        dst.data["inputs"][dst_slot]["link"] = lid
        return lid

    def __call__(self, node_type: str, *args, **kwargs) -> UINode:
        return self.add(node_type, *args, **kwargs)

    def wire(self, dst: UINode, **sources: tuple[UINode, int]) -> UINode:
        for name, source in sources.items():
            self.connect(source, dst, name)
        return dst

    def group(self, title: str, nodes: list, color: str = "#3f789e", pad: float = 40.0) -> None:
        xs, ys = [], []
        for n in nodes:
            d = n.data if isinstance(n, UINode) else n
            xs += [d["pos"][0], d["pos"][0] + d["size"][0]]
            ys += [d["pos"][1], d["pos"][1] + d["size"][1]]
        bounding = [min(xs) - pad / 2, min(ys) - pad * 1.6, max(xs) - min(xs) + pad, max(ys) - min(ys) + pad * 2.1]
        self.groups.append({"id": len(self.groups) + 1, "title": title, "bounding": [round(b, 1) for b in bounding],
                            "color": color, "font_size": 24, "flags": {}})

    # -- output --------------------------------------------------------------------------------------------------
    def to_json(self, workflow_id: Optional[str] = None, extra: Optional[dict] = None) -> dict:
        return {
            "id": workflow_id or str(uuid.uuid4()),
            "revision": 0,
            "last_node_id": len(self.nodes),
            "last_link_id": len(self.links),
            "nodes": self.nodes,
            "links": self.links,
            "groups": self.groups,
            "config": {},
            "extra": {"ds": {"scale": 0.6, "offset": [40, 60]}, **(extra or {})},
            "version": 0.4,
        }
