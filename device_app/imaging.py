"""Turn whatever a camera, a catalogue or an upload hands us into a clean RGB image.

Phones write EXIF orientation instead of rotating pixels, catalogues hold CMYK JPEGs and
transparent PNGs, uploads get cut off, and a hostile file can declare 20000x20000 pixels
in a few bytes. :func:`load_image` deals with all of that in one place and raises a
specific :class:`~auditlens.errors.ImageError` for what it cannot use.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from auditlens.errors import (
    ImageError,
    ImageTooLargeError,
    ImageTooSmallError,
    TruncatedImageError,
    UnreadableImageError,
)

ImageSource = str | os.PathLike | bytes | bytearray | BinaryIO | Image.Image | np.ndarray

DEFAULT_MAX_PIXELS = 100_000_000
"""Most pixels decoded (100 MP, far below a decompression bomb). A JPEG read with a draft
size counts the pixels it is decoded at: a 108 MP phone photo decodes at 1/8 scale. Pillow
refuses any image over ``2 * Image.MAX_IMAGE_PIXELS`` (179 MP) before that, so a 200 MP
photo must be resized first."""

MIN_SIDE = 16
"""Smallest width or height accepted; anything smaller cannot show a product."""

ACCEPTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "BMP", "GIF", "TIFF", "HEIF", "AVIF"})
"""Container formats a photo or original may come in (HEIF/AVIF only where Pillow decodes them)."""

BACKGROUND = (255, 255, 255)
"""Transparent pixels are composited on white, the background of catalogue originals."""


def _describe(source: ImageSource) -> str:
    if isinstance(source, np.ndarray):
        return f"<{'x'.join(map(str, source.shape))} {source.dtype} array>"
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, (bytes, bytearray)):
        return f"<{len(source)} bytes>"
    if isinstance(source, Image.Image):  # its file's name when opened from one
        return getattr(source, "filename", "") or "<image handed over as pixels>"
    return getattr(source, "name", "<stream>")


def not_a_file(path: Path) -> str:
    """Why a photo path that is not a regular file cannot be read, in words."""
    return ("a folder, not an image file" if path.is_dir() else
            "not a regular file" if path.exists() else "no such image file")


def _open(source: ImageSource) -> Image.Image:
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise UnreadableImageError(f"{path}: {not_a_file(path)}")
        if path.stat().st_size == 0:
            raise UnreadableImageError(f"{path}: the file is empty (0 bytes)")
    return Image.open(source)


def _head(source: ImageSource) -> tuple[bytes, int]:
    """The first 12 bytes of an encoded ``source`` and its length (b"", 0 if unreadable)."""
    try:
        if isinstance(source, (bytes, bytearray)):
            return bytes(source[:12]), len(source)
        if isinstance(source, (str, os.PathLike)):
            with open(source, "rb") as fh:
                return fh.read(12), os.fstat(fh.fileno()).st_size
        source.seek(0)  # Image.open reads a stream from its start as well
        return source.read(12), source.seek(0, io.SEEK_END)
    except (OSError, AttributeError, ValueError):
        return b"", 0


def _truncated_webp(source: ImageSource) -> bool:
    """Whether ``source`` is a WebP whose RIFF header declares more bytes than it holds
    (libwebp only says "could not create decoder object" for a cut-off file)."""
    head, length = _head(source)
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WEBP":
        return False
    return int.from_bytes(head[4:8], "little") + 8 > length


HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1", b"avif", b"avis")
"""ISO-BMFF brands of HEIF/HEIC (iPhones' default) and AVIF files."""


def _undecodable_heif(source: ImageSource) -> bool:
    """Whether ``source`` is a HEIF/HEIC/AVIF file, which Pillow here could not open."""
    head, _ = _head(source)
    return len(head) >= 12 and head[4:8] == b"ftyp" and head[8:12] in HEIF_BRANDS


def _truncated_webp_error(name: str) -> TruncatedImageError:
    return TruncatedImageError(
        f"{name}: the WebP data is cut off (the file is shorter than its header says); "
        "copy or upload the photo again"
    )


def load_image(
    source: ImageSource,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft: tuple[int, int] | None = None,
) -> Image.Image:
    """Decode ``source`` into an upright 8-bit RGB image.

    Args:
        source: a path, the encoded bytes, a binary file object, an already open image, or
            a pixel array (see :func:`image_from_array`).
        max_pixels: refuse images that declare more pixels than this, before decoding them.
        draft: for JPEGs, let the decoder skip detail down to at least this (width, height);
            a 12 MP photo then decodes at 1/8 of the cost. Other images are reduced by the
            same power of two after decoding (:func:`draft_scale`). The result is still at
            least as large as ``draft`` in both sides.

    Raises:
        UnreadableImageError: not an image, an unsupported format, or a corrupt stream.
        TruncatedImageError: the image data ends early.
        ImageTooLargeError: the header declares more than ``max_pixels`` pixels.
        ImageTooSmallError: a side is shorter than :data:`MIN_SIDE`.
        ImageError: an array of a shape or dtype :func:`image_from_array` does not accept.
    """
    name = _describe(source)
    if isinstance(source, np.ndarray):
        source = image_from_array(source, name, max_pixels)
    if isinstance(source, Image.Image):
        image = source
    else:
        try:
            with _pillow_quiet():
                image = _open(source)
        except Image.DecompressionBombError as exc:
            # Pillow's own guard (2x Image.MAX_IMAGE_PIXELS) fires before ours can
            found = re.search(r"\((\d+) pixels\)", str(exc))
            size = f"{int(found.group(1)):,} pixels" if found else "the image"
            if found and int(found.group(1)) > max_pixels:
                limit = f"the {max_pixels:,} allowed"
            else:
                limit = f"Pillow opens (Image.MAX_IMAGE_PIXELS x 2, {2 * (Image.MAX_IMAGE_PIXELS or 0):,})"
            why = f"{size} is more than {limit}"
            raise ImageTooLargeError(f"{name}: {why}; resize the photo before uploading it") from exc
        except (UnidentifiedImageError, SyntaxError, ValueError) as exc:
            if _truncated_webp(source):
                raise _truncated_webp_error(name) from exc
            if _undecodable_heif(source):
                raise UnreadableImageError(
                    f"{name}: a HEIC/HEIF or AVIF photo, which this installation cannot decode; "
                    "set the camera to JPEG ('Most Compatible' on an iPhone) or convert the photo "
                    "to JPEG") from exc
            raise UnreadableImageError(
                f"{name}: not a readable image (expected JPEG, PNG, WebP, BMP, GIF, TIFF, "
                "or HEIF/AVIF where Pillow decodes them)"
            ) from exc
        except OSError as exc:
            if "truncat" in str(exc).lower():  # the file ends inside its header
                raise TruncatedImageError(
                    f"{name}: the file ends inside the image header ({exc}); copy or upload "
                    "the photo again"
                ) from exc
            if _truncated_webp(source):
                raise _truncated_webp_error(name) from exc
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
    if min(width, height) < MIN_SIDE:
        raise ImageTooSmallError(
            f"{name}: {width}x{height} pixels is too small to show a product "
            f"(each side needs at least {MIN_SIDE})"
        )
    drafted = False
    if draft is not None and image.format in ("JPEG", "MPO"):
        drafted = image.draft("RGB", draft) is not None  # None: already decoded
    # the limit is on what gets decoded: a 108 MP phone JPEG drafted to 1/8 is 1.7 MP
    if image.size[0] * image.size[1] > max_pixels:
        decoded = f" (decoded at {image.size[0]}x{image.size[1]})" if drafted else ""
        raise ImageTooLargeError(
            f"{name}: {width}x{height} pixels{decoded} is more than the {max_pixels:,} allowed; "
            "resize the photo before uploading it"
        )
    try:
        with _pillow_quiet():
            image.load()
    except OSError as exc:
        if "truncat" in str(exc).lower():
            raise TruncatedImageError(
                f"{name}: the image data is cut off (the file ends before the image does); copy or "
                "upload the photo again"  # not Pillow's "(N bytes not processed)": N is not what is lost
            ) from exc
        raise UnreadableImageError(f"{name}: the image data is corrupt: {exc}") from exc
    except (SyntaxError, ValueError, EOFError) as exc:
        raise UnreadableImageError(f"{name}: the image data is corrupt: {exc}") from exc

    try:
        with _pillow_quiet():  # a damaged EXIF block warns as Pillow reads it
            image = ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block must not cost the photo; keep pixels as stored
        pass
    image = to_rgb(image)
    return image if draft is None or drafted else reduce_like_draft(image, draft)


@contextlib.contextmanager
def _pillow_quiet():
    """Pillow's own warnings while it opens and decodes a photo ("Corrupt EXIF data",
    "Truncated File Read", the decompression-bomb notice) stay quiet: what makes a photo
    unusable is auditlens' error to raise, and a service that turns warnings into errors
    would otherwise get a UserWarning for an upload instead of an ImageError."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
        yield


def draft_scale(size: tuple[int, int], draft: tuple[int, int]) -> int:
    """The reduction a JPEG decoder's draft mode makes of an image of ``size``: the largest
    of 8, 4 and 2 that leaves both sides at least ``draft``, else 1."""
    ratio = min(size[0] // draft[0], size[1] // draft[1])
    return next((s for s in (8, 4, 2) if ratio >= s), 1)


def reduce_like_draft(image: Image.Image, draft: tuple[int, int]) -> Image.Image:
    """``image`` brought to the scale a JPEG's draft decode reaches (:func:`draft_scale`),
    by box averaging, as the decoder's DCT scaling nearly is: other containers and pixels
    handed over decoded then reach the encoder as a JPEG of the same photo does."""
    scale = draft_scale(image.size, draft)
    return image.reduce(scale) if scale > 1 else image


FLOAT_UNIT_MAX = 1.5
"""Float pixels whose largest finite value is at most this are read as 0..1 (a bicubic
resize of a 0..1 image overshoots to about 1.05, a normalised one dips below 0). The one
ambiguity: a 0..255 float image whose brightest pixel is at most 1.5 (black to the eye)
is read as 0..1 and so brightened; pass uint8 pixels to avoid guessing."""


def _scale_to_uint8(values: np.ndarray, *, sixteen_bit: bool = False) -> np.ndarray:
    """Scale integer or float pixel values to uint8: 16-bit data (or values above 255) as
    0..65535, floats whose finite values are all at most :data:`FLOAT_UNIT_MAX` as 0..1
    (clipped: resampling and normalisation overshoot 0..1 a little), the rest as 0..255.
    NaN becomes black, +inf white, -inf black."""
    is_float = np.asarray(values).dtype.kind == "f"
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    if sixteen_bit or finite.max(initial=0) > 255:
        top = 65535.0
    elif is_float and finite.size and finite.max() <= FLOAT_UNIT_MAX:
        top = 1.0
    else:
        top = 255.0
    values = np.nan_to_num(values, nan=0.0, posinf=top, neginf=0.0)
    return np.clip(values * (255.0 / top), 0, 255).round().astype(np.uint8)


TRANSPARENT_SHARE = "auditlens_transparent_share"
"""Key of ``Image.info`` in which :func:`to_rgb` leaves the share of an image's pixels that
were see-through (alpha under half) before it composited them on white."""


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB, compositing transparency on white (the share
    of see-through pixels goes in ``info[TRANSPARENT_SHARE]``, so the quality check can say
    why the frame is white) and scaling 16-bit and float images instead of clipping them."""
    image.info.pop(TRANSPARENT_SHARE, None)  # only this function's own count may stand there
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        grey = _scale_to_uint8(np.asarray(image), sixteen_bit=mode.startswith("I;16"))
        return Image.fromarray(grey, "L").convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode == "La":  # premultiplied: Pillow converts it to LA only
        image, mode = image.convert("LA"), "LA"
    if mode in ("RGBA", "LA", "PA", "RGBa"):
        rgba = image.convert("RGBA")
        alpha = rgba.getchannel("A")
        canvas = Image.new("RGB", rgba.size, BACKGROUND)
        canvas.paste(rgba, mask=alpha)
        canvas.info[TRANSPARENT_SHARE] = float((np.asarray(alpha) < 128).mean())
        return canvas
    return image.convert("RGB")


def image_from_array(array: np.ndarray, name: str = "the pixel array",
                     max_pixels: int | None = None) -> Image.Image:
    """Turn a pixel array into a Pillow image for :func:`load_image`; one of more than
    ``max_pixels`` is refused before any of it is converted (a float array's conversion
    takes several times its own memory).

    Accepts grey (H, W) or (H, W, 1), RGB (H, W, 3) and RGBA (H, W, 4) arrays (alpha is
    composited on white later, as for files) of uint8, other integer types (uint16 as
    0..65535; others as 0..255, or 0..65535 where a value exceeds 255) or floats (0..1,
    clipped, when no finite value exceeds :data:`FLOAT_UNIT_MAX`, else 0..255); anything else raises
    :class:`~auditlens.errors.ImageError`.
    """
    array = np.asarray(array)
    if max_pixels is not None and array.ndim >= 2 and array.shape[0] * array.shape[1] > max_pixels:
        raise ImageTooLargeError(f"{name}: {array.shape[1]}x{array.shape[0]} pixels is more than the "
                                 f"{max_pixels:,} allowed; resize the photo before handing it over")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    shape_ok = array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))
    if not shape_ok or array.dtype.kind not in "uif":
        raise ImageError(
            f"{name}: cannot use an array of shape {array.shape} and dtype {array.dtype}; "
            "pass (H, W) or (H, W, 1) grey, (H, W, 3) RGB or (H, W, 4) RGBA pixels as "
            "uint8, another integer type, or floats (0..1 or 0..255)"
        )
    if array.dtype != np.uint8:
        array = _scale_to_uint8(array, sixteen_bit=array.dtype.kind == "u" and array.dtype.itemsize == 2)
    return Image.fromarray(np.ascontiguousarray(array))
