"""What every MemoRa node declares the same way, in one place: the schema skeleton and the inputs and outputs that
several nodes repeat. Each node module still lists its own inputs and outputs in its ``define_schema``; only the
pieces that are the same across nodes come from here.

The skeleton (``node``): the node id is the class name, the category sits under ``MemoRa``, and the description shown
in ComfyUI is the class docstring with its line breaks folded to spaces, so the text a user reads in the editor is
the first thing a reader of the class sees.

The base class (``MemoRaNode``): every MemoRa node derives from it, and its ``execute`` first checks every Float
input against the node's own schema (a finite number within the declared min and max). ComfyUI checks ranges only
for values typed into a widget, and NaN passes its ``val < min`` comparisons; a value that arrives through a link (a
primitive, a math node) is not checked at all. A ``validate_inputs`` classmethod would not do: linked values are
unknown when it runs, and a node that declares one with ``**kwargs`` loses ComfyUI's own range checks."""

from __future__ import annotations

import functools
import inspect
import math
import numbers

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
    for inp in schema.get("inputs") or []:
        if isinstance(inp, io.Float.Input) and not (_finite(inp.min) and _finite(inp.max)):
            raise TypeError(f"{cls.__name__}: Float input {inp.id!r} must declare a finite min and max (the range "
                            f"MemoRaNode checks every value against)")
    return io.Schema(node_id=cls.__name__, display_name=display_name, category=category,
                     description=description(cls), **schema)


# -- the base class: Float inputs checked at execute time ---------------------------------------------------------
class FloatInputError(ValueError):
    """A Float input of a MemoRa node that is not a finite number within the node's declared range."""


def _finite(x) -> bool:
    return isinstance(x, numbers.Real) and math.isfinite(x)


def float_ranges(schema: io.Schema) -> dict[str, tuple[float, float]]:
    """{input id: (min, max)} of the Float inputs of a node's schema."""
    return {inp.id: (inp.min, inp.max) for inp in schema.inputs or [] if isinstance(inp, io.Float.Input)}


def check_float_input(node: str, name: str, value, lo: float, hi: float) -> None:
    """FloatInputError unless ``value`` is a finite real number in [lo, hi] (None: an optional input left out)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise FloatInputError(f"{node}: input '{name}' must be a number in [{lo:g}, {hi:g}], got "
                              f"{type(value).__name__} {value!r}")
    v = float(value)
    if not (math.isfinite(v) and lo <= v <= hi):
        what = "not a finite number" if not math.isfinite(v) else "out of range"
        raise FloatInputError(f"{node}: input '{name}' is {v!r} ({what}); allowed: a finite number in "
                              f"[{lo:g}, {hi:g}]")


def _checked_execute(owner, fn):
    """``fn`` (a node's execute) preceded by the Float-input check of ``owner``'s schema, read once, on first use."""
    signature = inspect.signature(fn)
    cache: dict = {}

    def check(args, kwargs):
        if "ranges" not in cache:
            schema = owner.define_schema()
            cache["node"] = f"{schema.display_name} ({owner.__name__})"
            cache["ranges"] = float_ranges(schema)
        try:
            bound = signature.bind(owner, *args, **kwargs).arguments
        except TypeError:
            return  # a wrong call: execute itself raises the precise error
        for name, (lo, hi) in cache["ranges"].items():
            if name in bound:
                check_float_input(cache["node"], name, bound[name], lo, hi)

    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def execute(cls, *args, **kwargs):
            check(args, kwargs)
            return await fn(cls, *args, **kwargs)
    else:
        @functools.wraps(fn)
        def execute(cls, *args, **kwargs):
            check(args, kwargs)
            return fn(cls, *args, **kwargs)
    execute.memora_checked = True
    return execute


class MemoRaNode(io.ComfyNode):
    """Base of every MemoRa node: the ``execute`` a subclass defines is wrapped so that each Float input of the
    node's schema is checked (finite, within the declared min / max) before it runs, wherever the value came from
    (widget, link, a direct call); the error names the node, the input, the value and the allowed range."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        raw = cls.__dict__.get("execute")
        # ComfyUI's class clones (PREPARE_CLASS_CLONE, lock_class) copy the wrapped execute: wrap only once.
        if isinstance(raw, classmethod) and not getattr(raw.__func__, "memora_checked", False):
            cls.execute = classmethod(_checked_execute(cls, raw.__func__))


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
