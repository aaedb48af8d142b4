"""Window similarity and grouping (MustDrop's vision stage) against loops written out by hand."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from tokencompress.window_merge import window_groups, window_similarity


def similarity_by_hand(grid: torch.Tensor, window: int) -> list[float]:
    """grid (rows, cols, C): each whole window's mean cosine similarity over ordered pairs of distinct cells."""
    rows, cols = grid.shape[:2]
    out = []
    for top in range(0, rows // window * window, window):
        for left in range(0, cols // window * window, window):
            cells = [grid[top + r, left + c].double() for r in range(window) for c in range(window)]
            pairs = [float(a @ b / (a.norm() * b.norm())) for a, b in itertools.permutations(cells, 2)]
            out.append(sum(pairs) / len(pairs))
    return out


def groups_by_hand(merged: list[bool], rows: int, cols: int, window: int) -> list[int]:
    """Walk the cells in raster order; a merged window's cells take the id given at its first cell."""
    per_row = cols // window
    ids, given, next_id = [], {}, 0
    for r, c in itertools.product(range(rows), range(cols)):
        inside = r < rows // window * window and c < per_row * window
        w = (r // window) * per_row + c // window if inside else None
        if inside and merged[w]:
            if w not in given:
                given[w] = next_id
                next_id += 1
            ids.append(given[w])
        else:
            ids.append(next_id)
            next_id += 1
    return ids


@pytest.mark.parametrize(("rows", "cols", "window"), [(6, 6, 3), (7, 5, 2), (9, 12, 3), (4, 4, 2)])
def test_similarity_equals_hand(rows: int, cols: int, window: int) -> None:
    generator = torch.Generator().manual_seed(rows * cols)
    features = torch.randn(3, rows * cols, 8, generator=generator)
    features[1, : cols * window] = features[1, :1]  # whole windows of one repeated token: similarity 1
    got = window_similarity(features, rows, cols, window)
    for n in range(3):
        expected = similarity_by_hand(features[n].reshape(rows, cols, 8), window)
        assert got[n].tolist() == pytest.approx(expected, abs=1e-5)
    assert math.isclose(float(got[1, 0]), 1.0, abs_tol=1e-5)


@pytest.mark.parametrize(("rows", "cols", "window"), [(6, 6, 3), (7, 5, 2), (9, 12, 3)])
def test_groups_equal_hand(rows: int, cols: int, window: int) -> None:
    windows = (rows // window) * (cols // window)
    generator = torch.Generator().manual_seed(windows)
    merged = torch.rand(4, windows, generator=generator) < 0.5
    merged[0] = False
    merged[1] = True
    got = window_groups(merged, rows, cols, window)
    for n in range(4):
        assert got[n].tolist() == groups_by_hand(merged[n].tolist(), rows, cols, window)
    assert got[0].tolist() == list(range(rows * cols))  # nothing merged: every cell its own group
    assert int(got[1].max()) + 1 == rows * cols - windows * (window * window - 1)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="at least 2 x 2"):
        window_similarity(torch.zeros(1, 9, 4), 3, 3, window=1)
    with pytest.raises(ValueError, match="the grid is 3 x 4"):
        window_similarity(torch.zeros(1, 9, 4), 3, 4)
