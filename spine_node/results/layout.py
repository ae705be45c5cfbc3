"""Where finding labels go on the overlay: never over another label or another finding's box.

Pure geometry, in pixel coordinates of the (enlarged) image: ``x`` is the column, ``y`` the
row, rectangles are half-open ``[x0, x1) x [y0, y1)``.

Each label is tried, in order, just above its box, below it, beside it, inside its top
corner, then at grid positions ever further from the box; the first position inside the
image that touches no label already placed, no *other* finding's box and not the outline of
its own box wins (a label may sit inside its own box, whose finding it names, clear of the
outline). When nothing is free (findings covering the
image), the label goes to a column added to the right of the image, in finding order, and
the overlay draws a leader line from it to its box.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

#: How many grid positions around a box are tried before the side column is used.
MAX_GRID_CANDIDATES = 400


@dataclass(frozen=True)
class Rect:
    """Half-open pixel rectangle ``[x0, x1) x [y0, y1)``."""

    x0: int
    y0: int
    x1: int
    y1: int

    def __post_init__(self) -> None:
        if self.x1 < self.x0 or self.y1 < self.y0:
            raise ValueError(f"Rect needs x1 >= x0 and y1 >= y0, got {self!r}")

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    def intersects(self, other: Rect) -> bool:
        """True when the two rectangles share at least one pixel."""
        return (
            self.x0 < other.x1 and other.x0 < self.x1 and self.y0 < other.y1 and other.y0 < self.y1
        )

    def inside(self, width: int, height: int) -> bool:
        """True when the rectangle lies within ``[0, width) x [0, height)``."""
        return self.x0 >= 0 and self.y0 >= 0 and self.x1 <= width and self.y1 <= height

    def moved(self, x: int, y: int) -> Rect:
        """The same size with its top-left corner at ``(x, y)``."""
        return Rect(x, y, x + self.width, y + self.height)


@dataclass(frozen=True)
class Layout:
    """Label positions for one overlay.

    Attributes
    ----------
    labels : tuple of Rect
        One rectangle per finding, in finding order; those in the side column have
        ``x0 >= image_width``.
    side_width : int
        Columns added to the right of the image for the side column (0 when unused).
    """

    labels: tuple[Rect, ...]
    side_width: int

    def in_side_column(self, index: int, image_width: int) -> bool:
        """True when label ``index`` was put in the side column."""
        return self.labels[index].x0 >= image_width


def outline(box: Rect, edge: int) -> tuple[Rect, ...]:
    """The four strips, ``edge`` pixels wide, along the inside of ``box``."""
    e = max(1, min(edge, box.width, box.height))
    return (
        Rect(box.x0, box.y0, box.x1, box.y0 + e),
        Rect(box.x0, box.y1 - e, box.x1, box.y1),
        Rect(box.x0, box.y0, box.x0 + e, box.y1),
        Rect(box.x1 - e, box.y0, box.x1, box.y1),
    )


def place_labels(
    boxes: Sequence[Rect],
    sizes: Sequence[tuple[int, int]],
    width: int,
    height: int,
    edge: int = 1,
) -> Layout:
    """Place one label per box so that no label covers another label or another box.

    Parameters
    ----------
    boxes : sequence of Rect
        Finding boxes (already clipped or not; only their geometry matters).
    sizes : sequence of (int, int)
        ``(width, height)`` of each label, same order as ``boxes``.
    width, height : int
        Image size in pixels.
    edge : int
        Width in pixels of each box's drawn outline, measured inwards from the box's
        rectangle; a label never covers its own box's outline either.

    Returns
    -------
    Layout
        Rectangles in image coordinates; side-column labels lie right of ``width``.

    Raises
    ------
    ValueError
        When ``boxes`` and ``sizes`` differ in length, or a size or the image is empty.
    """
    if len(boxes) != len(sizes):
        raise ValueError(f"boxes and sizes differ in length: {len(boxes)} != {len(sizes)}")
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width} x {height}")
    for w, h in sizes:
        if w < 1 or h < 1:
            raise ValueError(f"label sizes must be positive, got {(w, h)}")
    placed: list[Rect | None] = []
    for index, (box, (w, h)) in enumerate(zip(boxes, sizes, strict=True)):
        others = [b for j, b in enumerate(boxes) if j != index]
        others.extend(outline(box, edge))
        taken = [r for r in placed if r is not None]
        spot = None
        for candidate in _candidates(box, w, h, width, height, edge):
            if candidate.inside(width, height) and not any(
                candidate.intersects(r) for r in (*taken, *others)
            ):
                spot = candidate
                break
        placed.append(spot)
    pending = [i for i, r in enumerate(placed) if r is None]
    side_width = 0
    if pending:
        side_width, column = _side_column([sizes[i] for i in pending], width, height)
        for i, rect in zip(pending, column, strict=True):
            placed[i] = rect
    return Layout(tuple(r for r in placed if r is not None), side_width)


def _candidates(box: Rect, w: int, h: int, width: int, height: int, edge: int) -> list[Rect]:
    label = Rect(0, 0, w, h)
    near = [
        (box.x0, box.y0 - h),  # above, left-aligned
        (box.x1 - w, box.y0 - h),  # above, right-aligned
        (box.x0, box.y1),  # below, left-aligned
        (box.x1 - w, box.y1),  # below, right-aligned
        (box.x1, box.y0),  # right of the box
        (box.x0 - w, box.y0),  # left of the box
        (box.x0 + edge, box.y0 + edge),  # inside, top-left corner, clear of the outline
        (box.x1 - edge - w, box.y1 - edge - h),  # inside, bottom-right corner
    ]
    out = [label.moved(x, y) for x, y in near]
    # grid positions by increasing distance from the box's top-left corner
    step_x, step_y = max(1, w // 2), max(1, h)
    grid = [
        (x, y)
        for y in range(0, max(1, height - h + 1), step_y)
        for x in range(0, max(1, width - w + 1), step_x)
    ]
    grid.sort(key=lambda p: (p[0] - box.x0) ** 2 + (p[1] - (box.y0 - h)) ** 2)
    out.extend(label.moved(x, y) for x, y in grid[:MAX_GRID_CANDIDATES])
    return out


def _side_column(
    sizes: Sequence[tuple[int, int]], width: int, height: int
) -> tuple[int, list[Rect]]:
    """Stack labels top to bottom right of the image, in as many columns as needed."""
    gap = 2
    rects: list[Rect] = []
    x, y, column_width = width + gap, gap, 0
    for w, h in sizes:
        if y + h > height and y > gap:  # this column is full: start the next one
            x += column_width + gap
            y, column_width = gap, 0
        rects.append(Rect(x, y, x + w, y + h))
        y += h + gap
        column_width = max(column_width, w)
    return x + column_width + gap - width, rects
