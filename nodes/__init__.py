"""ComfyUI glue: V3 node classes that translate ComfyUI types into calls to ``memora``.

The node list is explicit, as in ComfyUI's own comfy_extras: each node module lists its classes in ``NODES``, and
``NODE_MODULES`` below names the modules (nothing is discovered by importing whatever files are here). A new node
goes into its module's ``NODES``; a new module goes into ``NODE_MODULES``. tests/comfy/test_node_list.py checks that
every node class defined in this package is listed and that ComfyUI registers exactly these."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from . import (attack_embeddings, attack_probes, automemora, evaluation, flow, grid, inversion, lora, merge, micro,
               scores, train, unlearned)

# the order ComfyUI registers them in (and lists them in its node menu)
NODE_MODULES = (attack_embeddings, attack_probes, automemora, evaluation, flow, grid, inversion, lora, merge, micro,
                scores, train, unlearned)


def node_classes() -> list[type[io.ComfyNode]]:
    return [cls for module in NODE_MODULES for cls in module.NODES]


class MemoRaExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return node_classes()


async def comfy_entrypoint() -> MemoRaExtension:
    return MemoRaExtension()
