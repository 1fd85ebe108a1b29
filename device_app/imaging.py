"""Turn whatever a camera, a catalogue or an upload hands us into a clean RGB image.

Phones write EXIF orientation instead of rotating pixels, catalogues hold CMYK JPEGs and
transparent PNGs, uploads get cut off, and a hostile file can declare 20000x20000 pixels
in a few bytes. :func:`load_image` deals with all of that in one place and raises a
specific :class:`~auditlens.errors.ImageError` for what it cannot use.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from auditlens.errors import (
    ImageTooLargeError,
    ImageTooSmallError,
    TruncatedImageError,
    UnreadableImageError,
)

ImageSource = str | os.PathLike | bytes | bytearray | BinaryIO | Image.Image

DEFAULT_MAX_PIXELS = 100_000_000
"""Largest image accepted (100 MP: above any phone camera, far below a decompression bomb)."""

MIN_SIDE = 16
"""Smallest width or height accepted; anything smaller cannot show a product."""

ACCEPTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "BMP", "GIF", "TIFF", "HEIF", "AVIF"})
"""Container formats a photo or original may come in (HEIF/AVIF only where Pillow decodes them)."""

BACKGROUND = (255, 255, 255)
"""Transparent pixels are composited on white, the background of catalogue originals."""


def _describe(source: ImageSource) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, (bytes, bytearray)):
        return f"<{len(source)} bytes>"
    return getattr(source, "name", "<stream>")


def _open(source: ImageSource) -> Image.Image:
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise UnreadableImageError(f"{path}: no such image file")
        if path.stat().st_size == 0:
            raise UnreadableImageError(f"{path}: the file is empty (0 bytes)")
    return Image.open(source)


def load_image(
    source: ImageSource,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft: tuple[int, int] | None = None,
) -> Image.Image:
    """Decode ``source`` into an upright 8-bit RGB image.

    Args:
        source: a path, the encoded bytes, a binary file object, or an already open image.
        max_pixels: refuse images that declare more pixels than this, before decoding them.
        draft: for JPEGs, let the decoder skip detail down to at least this (width, height);
            a 12 MP photo then decodes at 1/8 of the cost. The result is still at least as
            large as ``draft`` in both sides.

    Raises:
        UnreadableImageError: not an image, an unsupported format, or a corrupt stream.
        TruncatedImageError: the image data ends early.
        ImageTooLargeError: the header declares more than ``max_pixels`` pixels.
        ImageTooSmallError: a side is shorter than :data:`MIN_SIDE`.
    """
    name = _describe(source)
    if isinstance(source, Image.Image):
        image = source
    else:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = _open(source)
        except Image.DecompressionBombError as exc:
            raise ImageTooLargeError(f"{name}: {exc}") from exc
        except (UnidentifiedImageError, SyntaxError, ValueError) as exc:
            raise UnreadableImageError(
                f"{name}: not a readable image (expected JPEG, PNG, WebP, BMP, GIF or TIFF)"
            ) from exc
        except OSError as exc:
            if "truncat" in str(exc).lower():  # the file ends inside its header
                raise TruncatedImageError(
                    f"{name}: the file ends inside the image header ({exc}); copy or upload "
                    "the photo again"
                ) from exc
            raise UnreadableImageError(f"{name}: cannot read image: {exc}") from exc

    # close what we opened, on errors too: an ImageError's traceback would otherwise keep
    # the file open for as long as the error lives (one descriptor per bad original)
    opened = None if isinstance(source, Image.Image) else image
    try:
        result = _decode(image, name, max_pixels, draft, check_format=opened is not None)
    except BaseException:
        if opened is not None:
            opened.close()
        raise
    if opened is not None and result is not opened:
        opened.close()
    return result


def _decode(image: Image.Image, name: str, max_pixels: int, draft: tuple[int, int] | None,
            check_format: bool) -> Image.Image:
    if check_format and image.format not in ACCEPTED_FORMATS:
        raise UnreadableImageError(f"{name}: image format {image.format} is not supported")

    width, height = image.size
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"{name}: {width}x{height} pixels is more than the {max_pixels:,} allowed; "
            "resize the photo before uploading it"
        )
    if min(width, height) < MIN_SIDE:
        raise ImageTooSmallError(
            f"{name}: {width}x{height} pixels is too small to show a product "
            f"(each side needs at least {MIN_SIDE})"
        )

    if draft is not None and image.format in ("JPEG", "MPO"):
        image.draft("RGB", draft)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
    except OSError as exc:
        if "truncat" in str(exc).lower():
            raise TruncatedImageError(
                f"{name}: the image data is cut off ({exc}); copy or upload the photo again"
            ) from exc
        raise UnreadableImageError(f"{name}: the image data is corrupt: {exc}") from exc
    except (SyntaxError, ValueError, EOFError) as exc:
        raise UnreadableImageError(f"{name}: the image data is corrupt: {exc}") from exc

    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block must not cost the photo; keep pixels as stored
        pass
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB, compositing transparency on white and
    scaling 16-bit and float images instead of clipping them."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        grey = np.clip(values * (255.0 / top), 0, 255).round().astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, BACKGROUND)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")
