"""The one preprocessing step shared by training, export and the device.

Training caches its images with :func:`to_model_input`, export feeds the representative
dataset through it, and the device runs it on every capture, so all three see exactly
the same pixels (``tests/test_preprocess.py`` proves the parity).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np
from PIL import Image

from auditlens.device_app.imaging import ImageSource, load_image
from auditlens.errors import ImageError

MAX_PHOTO_ZOOMS = 8
"""Photo zooms a spec may ask for; each is one more encoder run of every verification."""

MAX_PHOTO_VIEWS = 20
"""Encoder runs a spec may ask for per photo (zooms, their shifted copies and mirrors)."""

MAX_PHOTO_SHIFT = 0.35
"""The largest ``photo_shift`` (a 0.3 box moved to the crop box's edge)."""


@dataclass(frozen=True)
class PreprocessSpec:
    """How an image becomes the encoder's input; saved in every bundle's manifest."""

    input_size: int = 96
    """Side of the square RGB input of the encoder, in pixels."""

    crop: str = "center"
    """'center': the largest centred square, then resize; 'full': squash the whole frame."""

    photo_zooms: tuple[float, ...] = (1.0,)
    """The views a field photo is embedded as, their unit latents averaged: centred boxes
    this fraction of the crop box's side (1.0: the plain input, as catalogue originals
    always are). A studio original fills its frame while a field photo shows shelf
    around the product, so a tighter first view can match better: the shipped model card
    uses ``(0.7,)`` (docs/ablation.md, "The photo's crop"). Each further view costs one
    more encoder run."""

    photo_mirror: bool = False
    """Add the mirror image of every zoom to the photo's views (one more encoder run each).
    The shipped model card turns it on: though trained with mirrored views, its encoder
    does not map a photo and its mirror image to one point, and their average identifies
    better (docs/ablation.md, "The photo and its mirror image at test time"). Off by
    default, as a new model's card starts from the plain view."""

    photo_shift: float = 0.0
    """Also embed four copies of every zoom's box, moved left, right, up and down by this
    share of the crop box's side, to the nearest input pixel (four more encoder runs a
    zoom, eight with the mirror), so that a product off the frame's centre is seen whole
    in one of them; 0: none.
    Measured at 0.15 with the shipped model: trained products gain (EER 6.2% -> 5.8%),
    products enrolled after training stay level, for five times the encoder runs (a 1 MP
    verify about twice as long), so the shipped card leaves it off (docs/ablation.md,
    "Shifted copies of the photo's view"). Every box stays inside the crop box (zoom / 2 +
    shift <= 0.5)."""

    def __post_init__(self) -> None:
        if self.crop not in ("center", "full"):
            raise ValueError(f"crop must be 'center' or 'full', not {self.crop!r}")
        if not 16 <= self.input_size <= 1024:
            raise ValueError(f"input_size must be within 16..1024, not {self.input_size}")
        zooms = tuple(float(z) for z in self.photo_zooms)
        if not zooms or not all(0.3 <= z <= 1.0 for z in zooms):
            raise ValueError(f"photo_zooms must be one or more zooms within 0.3..1.0, not {zooms}")
        if len(zooms) > MAX_PHOTO_ZOOMS:
            raise ValueError(f"photo_zooms holds {len(zooms)} zooms, more than {MAX_PHOTO_ZOOMS}: each "
                             "costs one more encoder run of every verification")
        shift = float(self.photo_shift)
        if not 0.0 <= shift <= MAX_PHOTO_SHIFT or (shift and max(zooms) / 2 + shift > 0.5 + 1e-9):
            raise ValueError(f"photo_shift must be within 0..{MAX_PHOTO_SHIFT} and keep every shifted box inside "
                             f"the crop box (largest zoom / 2 + shift <= 0.5), not {shift:g} with zooms "
                             f"{', '.join(f'{z:g}' for z in zooms)}")
        if shift and min(shift_step(z, shift, self.input_size) for z in zooms) < 1:
            raise ValueError(f"photo_shift {shift:g} moves a {self.input_size} px view by less than one "
                             "pixel: its shifted copies would repeat the centred view; use a larger shift")
        object.__setattr__(self, "photo_zooms", zooms)
        object.__setattr__(self, "photo_shift", shift)
        if self.num_views > MAX_PHOTO_VIEWS:
            raise ValueError(f"these photo views take {self.num_views} encoder runs a photo, more than "
                             f"{MAX_PHOTO_VIEWS}")

    @property
    def num_views(self) -> int:
        return len(self.photo_zooms) * (5 if self.photo_shift else 1) * (2 if self.photo_mirror else 1)

    def to_dict(self) -> dict:
        """The spec as a manifest or model card stores it; ``photo_shift`` only when set, so
        a spec without it reads the same to a reader that predates it."""
        d = asdict(self)
        d["photo_zooms"] = list(self.photo_zooms)
        if not self.photo_shift:
            del d["photo_shift"]
        return d

    @classmethod
    def from_dict(cls, data: dict) -> PreprocessSpec:
        """Read a manifest's or model card's spec; one written before photo views existed
        embeds a photo as its plain input alone, as it did then."""
        size, crop = data["input_size"], data.get("crop", "center")
        zooms, mirror = data.get("photo_zooms", [1.0]), data.get("photo_mirror", False)
        shift = data.get("photo_shift", 0.0)
        if not isinstance(size, int) or isinstance(size, bool):
            raise ValueError(f"input_size {size!r} is not a whole number of pixels")
        if not isinstance(crop, str):
            raise ValueError(f"crop {crop!r} is not text")
        if not isinstance(zooms, (list, tuple)) or not all(
                isinstance(z, (int, float)) and not isinstance(z, bool) for z in zooms):
            raise ValueError(f"photo_zooms {zooms!r} is not a list of numbers")
        if not isinstance(mirror, bool):  # "false" would read as true
            raise ValueError(f"photo_mirror {mirror!r} is not true or false")
        if not isinstance(shift, (int, float)) or isinstance(shift, bool):
            raise ValueError(f"photo_shift {shift!r} is not a number")
        return cls(input_size=size, crop=crop, photo_zooms=tuple(zooms), photo_mirror=mirror,
                   photo_shift=shift)

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


def to_photo_views(image: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """The encoder inputs of a field photo, uint8 (V, S, S, 3): for each zoom its centred
    box, then with ``photo_shift`` that box moved left, right, up and down, each followed
    by its mirror image with ``photo_mirror``; a 1.0 zoom is :func:`to_model_input`. Zooms
    are taken from the decoded image, not the small input, so a zoomed view is as sharp as
    the plain one."""
    side = spec.input_size
    crop = crop_box(image.size, spec.crop)
    views = []
    for zoom in spec.photo_zooms:
        if zoom == 1.0:  # a shift needs a zoom below 1 (the spec checks), so this is one view
            boxes = [to_model_input(image, spec)]
        elif spec.photo_shift:
            boxes = _shifted_boxes(image, crop, zoom, spec.photo_shift, side)
        else:
            boxes = [_zoom_canvas(image, crop, zoom, side)]
        views += _with_mirrors(boxes, spec.photo_mirror)
    return np.stack(views)


def check_shift(spec: PreprocessSpec, shift: float) -> None:
    """Raise ValueError unless photos embedded with ``spec`` can take views moved by
    ``shift`` besides their own (a second look): views without shifted copies yet, and
    every moved box inside the crop box (the checks of the spec with that shift)."""
    if spec.photo_shift:
        raise ValueError("a second look adds shifted views, and the photo views already have them "
                         f"(photo_shift {spec.photo_shift:g})")
    replace(spec, photo_shift=shift)


def moved_views(image: Image.Image, spec: PreprocessSpec, shift: float) -> np.ndarray:
    """The views a photo's second look adds to its :func:`to_photo_views`: each zoom's box
    moved left, right, up and down by ``shift`` of the crop box's side (with mirror images
    when the spec has them), uint8 (4 * V, S, S, 3). With the first views they are the
    views of the spec with that ``photo_shift``; raises :func:`check_shift`'s ValueError."""
    check_shift(spec, shift)
    crop = crop_box(image.size, spec.crop)
    views = []
    for zoom in spec.photo_zooms:
        views += _with_mirrors(_shifted_boxes(image, crop, zoom, shift, spec.input_size)[1:], spec.photo_mirror)
    return np.stack(views)


def _with_mirrors(boxes: list[np.ndarray], mirror: bool) -> list[np.ndarray]:
    """``boxes``, each followed by its mirror image when ``mirror``."""
    if not mirror:
        return list(boxes)
    return [v for box in boxes for v in (box, np.ascontiguousarray(box[:, ::-1]))]


def _zoom_canvas(image: Image.Image, crop: tuple[int, int, int, int], zoom: float, side: int,
                 margin: int = 0) -> np.ndarray:
    """The centred box ``zoom`` of the crop box's side, resized to ``side`` pixels with
    ``margin`` more pixels of the photo, at the same scale, on every side, uint8."""
    left, top, right, bottom = crop
    width, height = right - left, bottom - top
    dx, dy = width * (1 - zoom) / 2, height * (1 - zoom) / 2
    mx, my = margin * zoom * width / side, margin * zoom * height / side
    box = (max(left, left + dx - mx), max(top, top + dy - my),  # inside, to rounding
           min(right, right - dx + mx), min(bottom, bottom - dy + my))
    out = side + 2 * margin
    return np.asarray(image.resize((out, out), Image.Resampling.BILINEAR, box=box, reducing_gap=3.0),
                      dtype=np.uint8)


def shift_step(zoom: float, shift: float, side: int) -> int:
    """``shift`` of the crop box's side in input pixels of a ``zoom`` box ``side`` pixels
    wide: the nearest whole number that keeps the moved box inside the crop box."""
    inside = int(np.floor((0.5 - zoom / 2) * side / zoom + 1e-9))
    return min(round(shift * side / zoom), inside)


def _shifted_boxes(image: Image.Image, crop: tuple[int, int, int, int], zoom: float, shift: float,
                   side: int) -> list[np.ndarray]:
    """The centred zoom box and its copies moved left, right, up and down by ``shift`` of
    the crop box's side (:func:`shift_step` input pixels), sliced from one resize of the
    region they cover: a fifth of the resizing that five boxes would cost."""
    step = shift_step(zoom, shift, side)
    canvas = _zoom_canvas(image, crop, zoom, side, step)
    return [np.ascontiguousarray(canvas[step + dy:step + dy + side, step + dx:step + dx + side])
            for dx, dy in ((0, 0), (-step, 0), (step, 0), (0, -step), (0, step))]


def pool_views(latents: np.ndarray, num_views: int) -> np.ndarray:
    """Unit latents (N * V, D) of N photos' consecutive views -> one unit latent each, (N, D)."""
    latents = np.asarray(latents, dtype=np.float32)
    pooled = latents.reshape(-1, num_views, latents.shape[-1]).mean(axis=1)
    return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)


def stack_inputs(sources, spec: PreprocessSpec, *, size: int | None = None,
                 views: bool = False) -> np.ndarray:
    """Decode and preprocess many images the device's way: uint8 (N, S, S, 3), or with
    ``views`` each photo's :func:`to_photo_views`, consecutive, (N * V, S, S, 3).

    ``size`` overrides the input side (plain inputs only). Every image is tried: one that
    cannot be used raises its :class:`~auditlens.errors.ImageError` (which names it),
    several one ``ImageError`` naming the first five and the count.
    """
    side = size or spec.input_size
    # reduced JPEG decoding as on the device, so large JPEGs give the device's pixels
    draft = spec.draft_size if views or not size else (2 * side, 2 * side)
    arrays, failed = [], []
    for src in sources:
        try:
            image = load_image(src, draft=draft)
        except ImageError as exc:
            failed.append(exc)
            continue
        arrays.append(to_photo_views(image, spec) if views else to_model_input(image, spec, size)[None])
    if len(failed) == 1:
        raise failed[0]
    if failed:
        more = f"; and {len(failed) - 5} more" if len(failed) > 5 else ""
        raise ImageError(f"{len(failed)} images cannot be used: " + "; ".join(map(str, failed[:5])) + more)
    return np.concatenate(arrays) if arrays else np.zeros((0, side, side, 3), np.uint8)


def load_model_input(source: ImageSource, spec: PreprocessSpec, **load_kwargs) -> np.ndarray:
    """Decode ``source`` (with reduced JPEG decoding) and preprocess it in one call."""
    image = load_image(source, draft=spec.draft_size, **load_kwargs)
    return to_model_input(image, spec)
