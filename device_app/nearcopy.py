"""Is a photo merely a copy of the catalogue original? Difference hashes of the whole
frame and of the frame with its plain border trimmed away.

A photo that reproduces the original (a download, a screenshot, a print-out scanned flat)
is sent back for a RETAKE: it proves nothing about the product on the shelf. The whole
frame's 64-bit dHash catches the original as it is, resized or re-encoded; a frame, a
letterbox or the plain canvas of a screenshot changes every bit of it. So the border of
one colour around a picture is trimmed, up to :data:`ROUNDS` times (a dark screen around
the original's own white background, then that background), and the dHash of each
trimmed box is kept beside the whole frame's. Enrolment keeps the same hashes of each
original; a photo copies the original when any of its hashes is within a few bits of
any of the original's.

Measured on grocery-dev with the shipped defaults: no photo of the 2,271 (train and val,
against any product's original) comes within 8 bits of an original's hashes, while each
of the 61 originals, re-encoded as a JPEG, is caught bare, in a dark or light frame,
letterboxed or pillarboxed on a black screen, on a light-grey canvas and in a dark
screenshot with its status and navigation bars; 98% are caught on a white canvas and 97%
in a light screenshot (the canvas and the original's background merge). A photo *of a
screen* showing the original is a new photograph, and this check does not catch it.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

ROUNDS = 3
"""Plain borders trimmed in turn (a screen's canvas, a frame, the studio background)."""
TOLERANCE = 12
"""Grey levels (0-255) within which a pixel counts as the border's colour."""
UNIFORM_SHARE = 0.97
"""Share of a row's or column's pixels in the border's colour for it to be border."""
SMALLEST_BOX = 0.2
"""A trimmed box under this share of the frame's width or height is not kept."""
INSET = 0.01
"""Share of a trimmed box's side (at least a pixel) taken off each side of it."""
GAP = 0.03
"""Plain lines inside a picture, up to this share of the frame, do not split it."""


def dhash(image: Image.Image) -> str:
    """64-bit difference hash (hex) of an image: robust to resizing and re-encoding."""
    grey = np.asarray(image.convert("L").resize((9, 8), Image.Resampling.BILINEAR), dtype=np.int16)
    bits = (grey[:, 1:] > grey[:, :-1]).flatten()
    return f"{int(''.join('1' if b else '0' for b in bits), 2):016x}"


def hamming(a: str, b: str) -> int:
    return (int(a, 16) ^ int(b, 16)).bit_count()


def _picture_run(content: np.ndarray, gap: int) -> tuple[int, int] | None:
    """The longest run (start, end) of ``content`` lines, bridging gaps of up to ``gap``
    plain lines (a picture's own blank line is not a border); None when there is none."""
    lines = np.flatnonzero(content)
    if not len(lines):
        return None
    cuts = np.flatnonzero(np.diff(lines) > gap + 1)
    starts, ends = lines[np.r_[0, cuts + 1]], lines[np.r_[cuts, len(lines) - 1]] + 1
    longest = int(np.argmax(ends - starts))
    return int(starts[longest]), int(ends[longest])


def trimmed_boxes(grey: Image.Image) -> list[tuple[int, int, int, int]]:
    """The boxes (left, top, right, bottom) of the picture inside the plain border of
    ``grey`` (an "L" image), then inside the plain border of that box, and so on: one box
    a round, outermost first; empty when the picture has no plain border. Between plain
    rows, the tallest band of picture is kept (a screenshot's status and navigation bars
    are bands of their own), then between plain columns the widest."""
    pixels = np.asarray(grey, dtype=np.int16)
    height, width = pixels.shape
    left, top, right, bottom = 0, 0, width, height
    boxes = []
    for _ in range(ROUNDS):
        box = pixels[top:bottom, left:right]
        edge = np.concatenate([box[0], box[-1], box[:, 0], box[:, -1]])
        plain = np.abs(box - np.int16(np.median(edge))) <= TOLERANCE  # int16: 5x faster than float
        rows = _picture_run(plain.sum(axis=1) < UNIFORM_SHARE * plain.shape[1], gap=int(GAP * height))
        if rows is None:
            break  # all border: nothing inside it
        band = plain[rows[0]:rows[1]]
        cols = _picture_run(band.sum(axis=0) < UNIFORM_SHARE * band.shape[0], gap=int(GAP * width))
        if cols is None:
            break
        new = (left + cols[0], top + rows[0], left + cols[1], top + rows[1])
        if new == (left, top, right, bottom):
            break
        # less the line where the border blends into the picture (resizing, JPEG): it
        # would change the bits of the picture's plain edges
        dx, dy = max(1, round(INSET * (new[2] - new[0]))), max(1, round(INSET * (new[3] - new[1])))
        new = (new[0] + dx, new[1] + dy, new[2] - dx, new[3] - dy)
        if new[2] - new[0] < SMALLEST_BOX * width or new[3] - new[1] < SMALLEST_BOX * height:
            break
        left, top, right, bottom = new
        boxes.append(new)
    return boxes


def trimmed_hashes(grey: Image.Image) -> tuple[str, ...]:
    """The dHashes of :func:`trimmed_boxes` of ``grey``, outermost first."""
    return tuple(dhash(grey.crop(box)) for box in trimmed_boxes(grey))


def copies(photo: tuple[str, ...], original: tuple[str, ...], bits: int) -> bool:
    """Whether any of a photo's hashes is within ``bits`` of any of an original's."""
    return any(hamming(a, b) <= bits for a in photo for b in original)
