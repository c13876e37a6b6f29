"""Boxes as RadVLM's instructions write them, and the fusion of several readers' boxes.

A box is ``(x1, y1, x2, y2)`` as fractions of the **original** image's width and height (x =
column / Columns, y = row / Rows), the frame in which the service maps answers back to pixels
(``radvlm.parsing``, which also writes them as text: ``[0.1, 0.23, 0.5, 0.6]``).

A box that cannot be placed (no area, or outside its image) is not dropped alone: the builders
leave its image out, since the image's other datapoints would then say less than its readers
saw (VinDr-CXR's detection would call an abnormal image normal). ``Placement`` keeps what one
pass of a builder placed and dropped, for the build to refuse or count.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ensemble_boxes import weighted_boxes_fusion

from radvlm.parsing import box_text, join_words

NormBox = tuple[float, float, float, float]

#: how far past its image's edge a box drawn on that image may reach, as a fraction of the side,
#: before it is taken to have been drawn on a larger image (readers draw inside it; a pixel is rounding)
EDGE = 0.01


class BadBox(ValueError):
    """A box that cannot be placed on its image; the message says which and why."""


class BoxOutside(BadBox):
    """A box that falls outside its image: drawn on a larger one (the original, where the image at hand
    is a downsampled copy)."""

    def __init__(self, box: tuple[float, ...], width: float, height: float) -> None:
        super().__init__(f"box {corners_text(box)} falls outside the {width:g}x{height:g} image")
        self.box = corners_text(box)
        self.size = f"{width:g}x{height:g}"


def corners_text(box: Sequence[float]) -> str:
    """A box as its source gave it, to six figures: ``(691, 1375, 1653, 1831)``."""
    return "(" + ", ".join(f"{value:g}" for value in box) + ")"


def normalise(x1: float, y1: float, x2: float, y2: float, width: float, height: float, *,
              spill: bool = True) -> NormBox:
    """Pixel corners to fractions of the image, clipped to [0, 1].

    A box without area is a ``BadBox``. One wholly outside the image is a ``BoxOutside``; so is one
    reaching more than ``EDGE`` past an edge unless ``spill`` (Chest ImaGenome's regions spill over
    the edge by design, and are clipped).
    """
    if width <= 0 or height <= 0:
        raise BadBox(f"image size {width}x{height}")
    (left, right), (top, bottom) = sorted((x1, x2)), sorted((y1, y2))
    if right - left <= 0 or bottom - top <= 0:
        raise BadBox(f"box {corners_text((x1, y1, x2, y2))} has no area")
    nx1, nx2 = min(max(left / width, 0.0), 1.0), min(max(right / width, 0.0), 1.0)
    ny1, ny2 = min(max(top / height, 0.0), 1.0), min(max(bottom / height, 0.0), 1.0)
    beyond = max(-left / width, -top / height, right / width - 1.0, bottom / height - 1.0)
    if nx2 - nx1 <= 0 or ny2 - ny1 <= 0 or (not spill and beyond > EDGE):
        raise BoxOutside((x1, y1, x2, y2), width, height)
    return nx1, ny1, nx2, ny2


def from_xywh(x: float, y: float, w: float, h: float, width: float, height: float, *,
              spill: bool = True) -> NormBox:
    """A top-left corner plus size in pixels (NIH, RSNA, MS-CXR) as a normalised box."""
    return normalise(x, y, x + w, y + h, width, height, spill=spill)


@dataclass(frozen=True)
class Dropped:
    """A box a builder could not place, with the image it belongs to (as the source names it)."""

    image: str
    error: BadBox
    on_image: bool  # its frame is the image file's size: outside it, the image is not the one drawn on


@dataclass
class Placement:
    """The boxes one pass of a builder placed and those it dropped; the images to leave out."""

    placed: int = 0
    dropped: list[Dropped] = field(default_factory=list)

    def normalise(self, image: str, corners: Sequence[float], width: float, height: float, *, spill: bool,
                  on_image: bool = True, xywh: bool = False) -> NormBox | None:
        """``normalise`` (``from_xywh`` with ``xywh``), or None with the box noted as dropped for ``image``.
        ``on_image``: the size is the image file's (not a table's own figure, nor 1 for fractions)."""
        try:
            box = (from_xywh if xywh else normalise)(*corners, width, height, spill=spill)  # type: ignore[operator]
        except BadBox as exc:
            self.drop(image, exc, on_image=on_image)
            return None
        self.placed += 1
        return box

    def drop(self, image: str, error: BadBox, *, on_image: bool = True) -> None:
        """Note a box of ``image`` that the builder could not read as a box at all."""
        self.dropped.append(Dropped(image, error, on_image))

    @property
    def boxes(self) -> int:
        """Boxes read, placed or not."""
        return self.placed + len(self.dropped)

    @property
    def outside(self) -> list[Dropped]:
        """Boxes outside the image file they were read for."""
        return [d for d in self.dropped if d.on_image and isinstance(d.error, BoxOutside)]

    @property
    def images(self) -> set[str]:
        """Images with a box dropped: the builders leave them out."""
        return {d.image for d in self.dropped}


def boxes_text(boxes: Sequence[NormBox]) -> str:
    """Boxes as RadVLM's answers write them: two decimals each, joined "a, b and c"; no box is ValueError."""
    return join_words([box_text(b) for b in boxes])


def fuse_readers(readers: Sequence[Sequence[tuple[NormBox, str]]], *, iou_thr: float,
                 skip_box_thr: float) -> dict[str, list[NormBox]]:
    """One set of boxes per label from several readers' boxes, by weighted box fusion.

    Each reader's boxes score 1.0 and weigh the same; fused boxes come back per label, in the
    order ``ensemble-boxes`` returns them (highest fused confidence first).
    """
    names = sorted({label for reader in readers for _, label in reader})
    if not names:
        return {}
    index = {name: i for i, name in enumerate(names)}
    boxes, scores, labels = [], [], []
    for reader in readers:
        boxes.append([list(b) for b, _ in reader])
        scores.append([1.0] * len(reader))
        labels.append([index[label] for _, label in reader])
    fused, _, fused_labels = weighted_boxes_fusion(boxes, scores, labels, iou_thr=iou_thr, skip_box_thr=skip_box_thr)
    out: dict[str, list[NormBox]] = {}
    for box, label in zip(fused, fused_labels):
        out.setdefault(names[int(label)], []).append(tuple(float(v) for v in box))  # type: ignore[arg-type]
    return out
