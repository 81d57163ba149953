"""A small builder for API-format ComfyUI graphs in tests."""

from __future__ import annotations


class Graph:
    def __init__(self):
        self.prompt: dict = {}
        self._n = 0

    def node(self, class_type: str, node_id: str | None = None, **inputs) -> "Ref":
        self._n += 1
        nid = node_id or str(self._n)
        self.prompt[nid] = {"class_type": class_type,
                            "inputs": {k: (v.out(0) if isinstance(v, Ref) else v) for k, v in inputs.items()}}
        return Ref(nid)


class Ref:
    def __init__(self, node_id: str):
        self.id = node_id

    def out(self, index: int) -> list:
        return [self.id, index]

    def __getitem__(self, index: int) -> list:
        return [self.id, index]
