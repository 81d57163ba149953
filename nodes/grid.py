"""The comparison grid in the editor: image batches side by side, captioned (memora.evaluation.grid draws it; the
same drawing as memora-batch's report.html)."""

from __future__ import annotations

import numpy as np
import torch
from comfy_api.latest import io

from memora.evaluation import grid as _grid
from . import _schema

LABEL_DEFAULTS = ("original", "unlearned", "recovered", "")


class MemoRaComparisonGrid(_schema.MemoRaNode):
    """Puts 2 to 4 image batches side by side in one captioned picture: one column per batch with its label on top
    (e.g. original | unlearned | recovered), one row per image index (image i of every batch, drawn with the same
    prompt and seed, sits in row i), the caption above. Connect the evaluation images of each model; connect the
    grid to Preview Image or Save Image. memora-batch's report.html draws its grids the same way."""

    @classmethod
    def define_schema(cls):
        inputs = []
        for i, label in enumerate(LABEL_DEFAULTS, start=1):
            optional = i > _grid.MIN_COLUMNS
            inputs.append(io.Image.Input(f"images_{i}", optional=optional,
                                         tooltip=f"Batch {i}: one column of the grid"
                                                 + (" (optional)." if optional else ".")))
            inputs.append(io.String.Input(f"label_{i}", default=label,
                                          tooltip=f"The label above column {i}."))
        inputs += [
            io.String.Input("caption", default="", multiline=True,
                            tooltip="Text above the grid: the prompt and seed, say."),
            io.Int.Input("rows", default=4, min=1, max=64,
                         tooltip="Images shown per batch (fewer when a batch is shorter)."),
            io.Int.Input("cell_size", default=256, min=16, max=1024,
                         tooltip="Each image is scaled to fit a square of this many pixels."),
        ]
        return _schema.node(cls, "MemoRa Comparison Grid", "evaluation", inputs=inputs, outputs=[
            io.Image.Output(display_name="grid", tooltip="The captioned grid, one image."),
        ])

    @classmethod
    def execute(cls, images_1, label_1, images_2, label_2, caption, rows, cell_size, images_3=None, label_3="",
                images_4=None, label_4="") -> io.NodeOutput:
        given = [(label_1, images_1), (label_2, images_2), (label_3, images_3), (label_4, images_4)]
        columns = []
        for i, (label, images) in enumerate(given, start=1):
            if images is None:
                continue
            if not isinstance(images, torch.Tensor) or images.ndim != 4:
                raise ValueError(f"MemoRa Comparison Grid: images_{i} must be an IMAGE batch (B x H x W x C), got "
                                 f"{getattr(images, 'shape', type(images).__name__)}")
            batch = images.detach().float().cpu().numpy()
            columns.append((str(label), [batch[b] for b in range(batch.shape[0])]))
        picture = _grid.comparison_grid(columns, caption=str(caption), rows=int(rows), cell=int(cell_size))
        out = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255.0)[None]
        return io.NodeOutput(out)


NODES = [MemoRaComparisonGrid]
