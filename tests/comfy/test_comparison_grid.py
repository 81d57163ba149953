"""MemoRa Comparison Grid in graphs run by ComfyUI's executor: image batches side by side, one column per batch in
input order with its label, one row per image index, the picture memora.evaluation.grid draws (the same code as
memora-batch's report.html); bad inputs refused with what was wrong."""

from __future__ import annotations

import numpy as np
import pytest
from graphs import Graph

from memora.evaluation import grid as _grid

RED, GREEN, BLUE, GREY = 0xFF0000, 0x00FF00, 0x0000FF, 0x808080


def _batch(g: Graph, color: int, n: int, size: int = 24):
    return g.node("EmptyImage", width=size, height=size, batch_size=n, color=color)


def _columns_of(grid: np.ndarray, colors: list[tuple]) -> list[np.ndarray]:
    return [np.unique(np.argwhere(np.all(grid == np.array(c, np.uint8), axis=-1))[:, 1]) for c in colors]


def test_grid_node_puts_batches_side_by_side_like_the_report(comfy):
    g = Graph()
    a, b, c = _batch(g, RED, 5), _batch(g, GREEN, 5), _batch(g, BLUE, 3)
    node = g.node("MemoRaComparisonGrid", images_1=a[0], label_1="original", images_2=b[0], label_2="unlearned",
                  images_3=c[0], label_3="recovered", label_4="", caption="prompt 'a photo of a star', seed 1",
                  rows=4, cell_size=48)
    g.node("PreviewImage", images=node[0])
    res = comfy.run(g.prompt)
    assert res.success, res.error_message
    (out,) = comfy.node_outputs(node.id)
    assert out.ndim == 4 and out.shape[0] == 1 and out.shape[-1] == 3
    picture = np.round(out[0].numpy() * 255).astype(np.uint8)
    # three rows (the shortest batch has 3 images), 24 px images enlarged to 48 px cells, columns in input order
    red, green, blue = _columns_of(picture, [(255, 0, 0), (0, 255, 0), (0, 0, 255)])
    assert len(red) == len(green) == len(blue) == 48
    assert red.max() < green.min() and green.max() < blue.min()
    rows = np.unique(np.argwhere(np.all(picture == np.array((0, 0, 255), np.uint8), axis=-1))[:, 0])
    assert len(rows) == 3 * 48
    # the same picture as the shared drawing code makes from the same images
    batches = [comfy.node_outputs(x.id)[0].numpy() for x in (a, b, c)]
    expected = _grid.comparison_grid([(lbl, list(im)) for lbl, im in zip(("original", "unlearned", "recovered"),
                                                                          batches)],
                                     caption="prompt 'a photo of a star', seed 1", rows=4, cell=48)
    assert np.array_equal(np.asarray(expected), picture)
    # captions and labels are drawn: dark text pixels above the first row of images
    top = rows.min()
    assert (picture[:top] < 100).all(axis=-1).sum() > 50


def test_grid_node_with_two_batches_and_one_row(comfy):
    g = Graph()
    node = g.node("MemoRaComparisonGrid", images_1=_batch(g, GREY, 2)[0], label_1="a", images_2=_batch(g, RED, 2)[0],
                  label_2="b", label_3="", label_4="", caption="", rows=1, cell_size=16)
    g.node("PreviewImage", images=node[0])
    res = comfy.run(g.prompt)
    assert res.success, res.error_message
    picture = np.round(comfy.node_outputs(node.id)[0][0].numpy() * 255).astype(np.uint8)
    assert len(np.unique(np.argwhere(np.all(picture == (255, 0, 0), axis=-1))[:, 0])) == 16  # one 16 px row


def test_grid_refuses_what_it_cannot_draw():
    with pytest.raises(_grid.GridInputError, match="2 to 4 image batches, got 1"):
        _grid.comparison_grid([("only", [np.zeros((4, 4, 3))])])
    with pytest.raises(_grid.GridInputError, match=r"column 2 \('empty'\) has no images"):
        _grid.comparison_grid([("a", [np.zeros((4, 4, 3))]), ("empty", [])])
    with pytest.raises(_grid.GridInputError, match="NaN or infinite"):
        _grid.comparison_grid([("a", [np.full((4, 4, 3), np.nan)]), ("b", [np.zeros((4, 4, 3))])])
    with pytest.raises(_grid.GridInputError, match=r"H x W x C .* got shape \(4, 4, 5\)"):
        _grid.comparison_grid([("a", [np.zeros((4, 4, 5))]), ("b", [np.zeros((4, 4, 3))])])
