"""A small builder for API-format ComfyUI graphs in tests, the stages several tests build, and a run that keeps the
log lines ComfyUI wrote meanwhile."""

from __future__ import annotations

import logging


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


def sampled_preview(g: Graph, model, positive, latent, vae, **sampler) -> Ref:
    """A stock KSampler (``sampler``: seed, steps, cfg, sampler_name, scheduler; the positive prompt also as the
    negative, denoise 1) decoded into a PreviewImage, an output, so that the executor runs it; the KSampler's Ref."""
    ks = g.node("KSampler", model=model, positive=positive, negative=positive, latent_image=latent, denoise=1.0,
                **sampler)
    g.node("PreviewImage", images=g.node("VAEDecode", samples=ks[0], vae=vae)[0])
    return ks


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def run_logged(comfy, prompt: dict):
    """``comfy.run(prompt)`` with every message logged meanwhile (root logger, any level): (result, messages)."""
    handler = _Records()
    logging.getLogger().addHandler(handler)
    try:
        res = comfy.run(prompt)
    finally:
        logging.getLogger().removeHandler(handler)
    return res, handler.messages
