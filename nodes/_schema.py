"""What every MemoRa node declares the same way, in one place: the schema skeleton and the inputs and outputs that
several nodes repeat. Each node module still lists its own inputs and outputs in its ``define_schema``; only the
pieces that are the same across nodes come from here.

The skeleton (``node``): the node id is the class name, the category sits under ``MemoRa``, and the description shown
in ComfyUI is the class docstring with its line breaks folded to spaces, so the text a user reads in the editor is
the first thing a reader of the class sees."""

from __future__ import annotations

from comfy_api.latest import io

CATEGORY = "MemoRa"


def description(cls) -> str:
    """The class docstring as one paragraph (line breaks and their indentation become single spaces)."""
    doc = cls.__doc__
    if not doc or not doc.strip():
        raise TypeError(f"{cls.__name__}: a MemoRa node needs a docstring (it is the description ComfyUI shows)")
    return " ".join(line.strip() for line in doc.strip().splitlines())


def node(cls, display_name: str, section: str = "", **schema) -> io.Schema:
    """The io.Schema of node class ``cls``: id = class name, category ``MemoRa`` or ``MemoRa/<section>``, description
    = the docstring; ``schema`` gives the rest (inputs, outputs, is_output_node, hidden, ...)."""
    category = f"{CATEGORY}/{section}" if section else CATEGORY
    return io.Schema(node_id=cls.__name__, display_name=display_name, category=category,
                     description=description(cls), **schema)


# -- inputs several nodes declare ---------------------------------------------------------------------------------
def images_input(name: str, tooltip: str) -> io.Image.Input:
    return io.Image.Input(name, tooltip=tooltip)


def save_name_input(default: str, tooltip: str) -> io.String.Input:
    """The LoRA file prefix under models/loras (checked by ``_lora_host.check_save_name``)."""
    return io.String.Input("save_name", default=default, tooltip=tooltip)


# -- outputs several nodes declare --------------------------------------------------------------------------------
def report_output(tooltip: str) -> io.String.Output:
    return io.String.Output(display_name="report", tooltip=tooltip)


def filename_output(tooltip: str) -> io.String.Output:
    """The saved file, relative to the loras folder (empty when nothing was saved)."""
    return io.String.Output(display_name="filename", tooltip=tooltip)


def lora_output(tooltip: str) -> io.LoraModel.Output:
    return io.LoraModel.Output(display_name="lora", tooltip=tooltip)


def latent_output(tooltip: str) -> io.Latent.Output:
    return io.Latent.Output(display_name="latent", tooltip=tooltip)
