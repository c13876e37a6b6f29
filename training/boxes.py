"""Boxes as RadVLM's instructions write them, and the fusion of several readers' boxes.

A box is ``(x1, y1, x2, y2)`` as fractions of the **original** image's width and height (x =
column / Columns, y = row / Rows), the frame in which the service maps answers back to pixels
(``worker.parsing``, which also writes them as text: ``[0.1, 0.23, 0.5, 0.6]``).
"""

from __future__ import annotations

from collections.abc import Sequence

from ensemble_boxes import weighted_boxes_fusion

from worker.parsing import box_text, join_words

NormBox = tuple[float, float, float, float]


class BadBox(ValueError):
    """A box that cannot be placed on its image; the message says which and why."""


def normalise(x1: float, y1: float, x2: float, y2: float, width: float, height: float) -> NormBox:
    """Pixel corners to fractions of the image, clipped to [0, 1]; an empty box is a ``BadBox``."""
    if width <= 0 or height <= 0:
        raise BadBox(f"image size {width}x{height}")
    nx1, nx2 = sorted((min(max(x1 / width, 0.0), 1.0), min(max(x2 / width, 0.0), 1.0)))
    ny1, ny2 = sorted((min(max(y1 / height, 0.0), 1.0), min(max(y2 / height, 0.0), 1.0)))
    if nx2 - nx1 <= 0 or ny2 - ny1 <= 0:
        raise BadBox(f"box {x1, y1, x2, y2} is empty on a {width}x{height} image")
    return nx1, ny1, nx2, ny2


def from_xywh(x: float, y: float, w: float, h: float, width: float, height: float) -> NormBox:
    """A top-left corner plus size in pixels (NIH, RSNA, MS-CXR) as a normalised box."""
    return normalise(x, y, x + w, y + h, width, height)


def boxes_text(boxes: Sequence[NormBox]) -> str:
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
