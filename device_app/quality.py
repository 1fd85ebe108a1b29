"""Is this capture good enough to judge? Catching bad captures early turns a wrong
verdict into a RETAKE the auditor can act on.

The checks are cheap image statistics on a small grey copy of the capture: brightness,
clipped highlights, sharpness (variance of the Laplacian), detail inside the framing
guide (a nearly uniform centre means the product is missing or far too small) and a
frame with no detail at all (blank); and on a few thousand of its pixels, its colour: a
greyscale photo (a camera's mono filter, an image converted to grey) loses what tells most
products apart, and the encoder judges it as poorly as a blurred one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from auditlens.device_app.imaging import TRANSPARENT_SHARE, to_rgb

ANALYSIS_SIDE = 256
"""The capture is analysed at this size, so thresholds do not depend on the camera."""


@dataclass(frozen=True)
class QualityThresholds:
    """Limits beyond which a capture is sent back for a retake."""

    min_brightness: float = 40.0
    """Mean luminance (0-255) below which the capture is too dark."""
    max_clipped: float = 0.45
    """Fraction of pixels at >= 250 above which the capture is overexposed or glared."""
    min_sharpness: float = 8.0
    """Variance of the Laplacian below which the capture is too blurred."""
    min_centre_detail: float = 4.0
    """Standard deviation of luminance in the framing guide below which no product shows."""
    min_frame_detail: float = 1.0
    """Standard deviation of luminance over the whole frame below which the capture is
    blank (one flat colour: a covered lens, an empty or fully transparent image)."""
    min_colour: float = 3.0
    """Mean chroma (the largest minus the smallest of R, G and B, 0-255) below which the
    capture has no colour; every one of the 2,271 grocery-dev field photos measures 19 or
    more, a greyscale photo 0."""

    def __post_init__(self) -> None:
        """Refuse limits that would fail on every capture (text read from a service's
        settings) or turn a check off unnoticed (NaN compares false with everything)."""
        for name, most in (("min_brightness", 255.0), ("max_clipped", 1.0), ("min_sharpness", None),
                           ("min_centre_detail", 255.0), ("min_frame_detail", 255.0), ("min_colour", 255.0)):
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, (int, float, np.number))
                    or not np.isfinite(value) or value < 0 or (most is not None and value > most)):
                span = f"0 to {most:g}" if most is not None else "0 or more"
                raise ValueError(f"QualityThresholds.{name} must be a number {span}, not {value!r}")
            object.__setattr__(self, name, float(value))


@dataclass(frozen=True)
class Quality:
    """Measured capture statistics and the problems they reveal."""

    brightness: float
    clipped: float
    sharpness: float
    centre_detail: float
    issues: tuple[str, ...]
    colour: float = 0.0
    """Mean chroma of the capture (0-255; 0 for a greyscale one)."""

    @property
    def ok(self) -> bool:
        return not self.issues

    def to_dict(self) -> dict:
        d = asdict(self)
        d["issues"] = list(self.issues)
        return d


def _laplacian_variance(grey: np.ndarray) -> float:
    if min(grey.shape) < 3:  # a Laplacian needs 3 rows and 3 columns: no detail to measure
        return 0.0
    lap = (grey[1:-1, :-2] + grey[1:-1, 2:] + grey[:-2, 1:-1] + grey[2:, 1:-1]
           - 4.0 * grey[1:-1, 1:-1])
    return float(lap.var())


COLOUR_SAMPLES = 48
"""The colour check reads a COLOUR_SAMPLES x COLOUR_SAMPLES grid of the capture's pixels."""


def colourfulness(image: Image.Image) -> float:
    """Mean chroma (max - min of R, G, B) over a grid of the image's pixels: 0 for a
    greyscale image, whatever its mode. Sampling (nearest pixels, no filtering) keeps it
    cheap on a 12 MP capture."""
    grid = image.resize((min(COLOUR_SAMPLES, image.width), min(COLOUR_SAMPLES, image.height)),
                        Image.Resampling.NEAREST)  # sampled first: only the grid is converted
    pixels = np.asarray(grid if grid.mode == "RGB" else grid.convert("RGB"), dtype=np.int16)
    return float((pixels.max(axis=2) - pixels.min(axis=2)).mean())


def analysis_copy(image: Image.Image) -> Image.Image:
    """The small grey copy of a capture that :func:`assess` measures (at most
    :data:`ANALYSIS_SIDE` pixels a side); the near-copy dHash is taken from it too."""
    small = image.convert("L")  # a copy even of an "L" image: thumbnail works in place
    small.thumbnail((ANALYSIS_SIDE, ANALYSIS_SIDE), Image.Resampling.BILINEAR)
    return small


def assess(image: Image.Image, thresholds: QualityThresholds | None = None, *,
           analysed: Image.Image | None = None) -> Quality:
    """Measure a capture (RGB; an image of another mode is converted as the loader converts
    it, :func:`~auditlens.device_app.imaging.to_rgb`, so a greyscale "L" one is sent back
    for its lack of colour) and list what would make its verdict unreliable;
    ``analysed``: its :func:`analysis_copy`, when the caller has it.

    A capture so thin that its analysis copy is under 3 pixels high or wide (e.g. 20000x16)
    has no measurable detail: its sharpness is 0 and it is sent back as too narrow."""
    t = thresholds or QualityThresholds()
    if image.mode != "RGB":
        image = to_rgb(image)  # transparency on white, 16-bit scaled: what a verify sees
    small = analysed if analysed is not None else analysis_copy(image)
    grey = np.asarray(small, dtype=np.float32)
    brightness = float(grey.mean())
    clipped = float((grey >= 250).mean())
    sharpness = _laplacian_variance(grey)
    h, w = grey.shape
    centre = grey[h // 4: h - h // 4, w // 4: w - w // 4]
    centre_detail = float(centre.std())
    colour = colourfulness(image)

    issues = []
    if brightness < t.min_brightness:
        issues.append("too dark: turn on more light or move the product to a brighter spot")
    elif float(grey.std()) < t.min_frame_detail:  # lit, and nothing in it but one colour
        return Quality(brightness, clipped, sharpness, centre_detail, (
            "blank: the photo is one flat colour with nothing in it (a covered lens, an empty "
            "or fully transparent image); photograph the product",), colour)
    if clipped > t.max_clipped:
        see_through = image.info.get(TRANSPARENT_SHARE)
        see_through = see_through if isinstance(see_through, float) and 0 <= see_through <= 1 else 0.0
        if see_through >= t.max_clipped / 2:
            issues.append(f"partly transparent: {see_through:.0%} of the image is see-through and shows "
                          "as white; send the camera's photo, not a cut-out")
        opaque = 1.0 - see_through  # the rest glares too: judged as a whole frame would be
        if see_through < t.max_clipped / 2 or (opaque > 0 and (clipped - see_through) / opaque > t.max_clipped):
            issues.append("overexposed or glare: avoid direct light on the product")
    exposure_off = bool(issues)  # detail is not measurable in a dark or washed-out frame
    if min(grey.shape) < 3:
        issues.append(f"too narrow: a {image.width}x{image.height} photo shows no usable detail; "
                      "photograph the whole product")
    elif sharpness < t.min_sharpness and not exposure_off:
        issues.append("too blurred: hold still and let the camera focus")
    if centre_detail < t.min_centre_detail and not exposure_off:
        issues.append("no product in the frame: fill the framing guide with the product")
    if colour < t.min_colour and not exposure_off:
        issues.append("no colour: the photo is greyscale; turn off the camera's mono or black "
                      "and white filter and photograph the product in colour")
    return Quality(brightness, clipped, sharpness, centre_detail, tuple(issues), colour)
