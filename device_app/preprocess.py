"""The one preprocessing step shared by training, export and the device.

Training caches its images with :func:`to_model_input`, export feeds the representative
dataset through it, and the device runs it on every capture, so all three see exactly
the same pixels (``tests/test_preprocess.py`` proves the parity).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from auditlens.device_app.imaging import ImageSource, load_image


@dataclass(frozen=True)
class PreprocessSpec:
    """How an image becomes the encoder's input; saved in every bundle's manifest."""

    input_size: int = 96
    """Side of the square RGB input of the encoder, in pixels."""

    crop: str = "center"
    """'center': the largest centred square, then resize; 'full': squash the whole frame."""

    def __post_init__(self) -> None:
        if self.crop not in ("center", "full"):
            raise ValueError(f"crop must be 'center' or 'full', not {self.crop!r}")
        if not 16 <= self.input_size <= 1024:
            raise ValueError(f"input_size must be within 16..1024, not {self.input_size}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PreprocessSpec:
        return cls(input_size=int(data["input_size"]), crop=str(data.get("crop", "center")))

    @property
    def draft_size(self) -> tuple[int, int]:
        """Smallest decode size that still leaves 2x headroom for an antialiased resize."""
        side = 2 * self.input_size
        return (side, side)


def crop_box(size: tuple[int, int], crop: str) -> tuple[int, int, int, int]:
    """The (left, top, right, bottom) box of ``size`` that the encoder looks at."""
    width, height = size
    if crop == "full":
        return (0, 0, width, height)
    side = min(width, height)
    left = (width - side) // 2
    top = (height - side) // 2
    return (left, top, left + side, top + side)


def to_model_input(image: Image.Image, spec: PreprocessSpec, size: int | None = None) -> np.ndarray:
    """Crop and resize an RGB image to the encoder's uint8 input, shape (S, S, 3).

    ``size`` overrides ``spec.input_size`` (training caches a larger copy to crop from).
    """
    side = size or spec.input_size
    box = crop_box(image.size, spec.crop)
    resized = image.resize((side, side), Image.Resampling.BILINEAR, box=box, reducing_gap=3.0)
    return np.asarray(resized, dtype=np.uint8)


def load_model_input(source: ImageSource, spec: PreprocessSpec, **load_kwargs) -> np.ndarray:
    """Decode ``source`` (with reduced JPEG decoding) and preprocess it in one call."""
    image = load_image(source, draft=spec.draft_size, **load_kwargs)
    return to_model_input(image, spec)
