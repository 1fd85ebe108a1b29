"""Helpers of the robustness suite: generated images, crafted headers, a hang guard."""

from __future__ import annotations

import io
import signal
import struct
import zlib
from contextlib import contextmanager

import numpy as np
from PIL import Image


# -- images -----------------------------------------------------------------------------
def product_image(seed: int, size: tuple[int, int] = (200, 160)) -> Image.Image:
    """A synthetic, textured 'product' photo: distinct per seed, passes quality checks."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([
        127 + 100 * np.sin(x / (7 + seed % 5) + seed),
        127 + 100 * np.cos(y / (5 + seed % 7) - seed),
        127 + 100 * np.sin((x + y) / (9 + seed % 3)),
    ], axis=-1)
    blocks = rng.integers(-60, 60, size=(8, 8, 3))
    blocks = blocks.repeat(-(-h // 8), 0)[:h].repeat(-(-w // 8), 1)[:, :w]
    return Image.fromarray(np.clip(base + blocks, 0, 255).astype(np.uint8), "RGB")


def encode(image: Image.Image, fmt: str = "JPEG", **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int, *, bit_depth: int = 8, colour: int = 2) -> bytes:
    """A PNG that declares ``width`` x ``height`` pixels but holds no pixel data: a
    decompression bomb costs its victim memory, not its author bandwidth."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IEND", b"")


# -- hang guard ---------------------------------------------------------------------------
@contextmanager
def time_limit(seconds: int, what: str = "the call"):
    """Fail (instead of hanging CI) if the block runs longer than ``seconds``."""
    def _alarm(signum, frame):
        raise TimeoutError(f"{what} took more than {seconds} s (hang?)")

    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# -- the hostile corpus -----------------------------------------------------------------
OK = "ok"


def _jpeg_with_size(width: int, height: int) -> bytes:
    """A real (small) JPEG whose frame header is patched to declare ``width`` x ``height``."""
    data = bytearray(encode(product_image(1, (64, 48)), "JPEG", quality=80))
    i = 2
    while i < len(data):
        marker = data[i + 1]
        length = struct.unpack(">H", data[i + 2:i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            data[i + 5:i + 9] = struct.pack(">HH", height, width)
            return bytes(data)
        i += 2 + length
    raise AssertionError("no SOF marker")


def _gif_with_size(width: int, height: int) -> bytes:
    """A GIF whose screen and only frame declare ``width`` x ``height``, with one byte of data."""
    screen = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x44\x01\x00"
    return screen + frame + b"\x3b"


def exif_jpeg(orientation: int | bytes | None, upright: Image.Image) -> bytes:
    """A JPEG whose pixels are stored as a camera held ``orientation`` way would store them,
    with the EXIF Orientation tag that tells a viewer how to show ``upright``.

    The stored layouts follow the EXIF 2.32 definition of the tag (row 0 / column 0 of the
    stored image are the visual ...), written with numpy, not with Pillow's transposes."""
    a = np.asarray(upright)
    stored = {
        1: a,                         # row 0 = top,    col 0 = left
        2: a[:, ::-1],                # row 0 = top,    col 0 = right
        3: a[::-1, ::-1],             # row 0 = bottom, col 0 = right
        4: a[::-1, :],                # row 0 = bottom, col 0 = left
        5: a.transpose(1, 0, 2),      # row 0 = left,   col 0 = top
        6: np.rot90(a, 1),            # row 0 = right,  col 0 = top
        7: np.rot90(a[::-1], 1),      # row 0 = right,  col 0 = bottom
        8: np.rot90(a, -1),           # row 0 = left,   col 0 = bottom
    }.get(orientation if isinstance(orientation, int) else 1, a)
    img = Image.fromarray(np.ascontiguousarray(stored), "RGB")
    if orientation is None:
        return encode(img, "JPEG", quality=95)
    if isinstance(orientation, bytes):  # a raw (possibly broken) EXIF block
        return encode(img, "JPEG", quality=95, exif=orientation)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(img, "JPEG", quality=95, exif=exif.tobytes())


def quadrants(width: int = 96, height: int = 64) -> Image.Image:
    """Red top-left, green top-right, blue bottom-left, white bottom-right: any rotation or
    mirror moves at least one colour to another quadrant."""
    a = np.zeros((height, width, 3), np.uint8)
    a[: height // 2, : width // 2] = (255, 0, 0)
    a[: height // 2, width // 2:] = (0, 255, 0)
    a[height // 2:, : width // 2] = (0, 0, 255)
    a[height // 2:, width // 2:] = (255, 255, 255)
    return Image.fromarray(a, "RGB")


def build_corpus() -> list[tuple[str, str, bytes, str]]:
    """(case, file name, bytes, expected outcome): an ImageError subclass name or 'ok'."""
    photo = product_image(7, (400, 300))
    jpeg = encode(photo, "JPEG", quality=90)
    png = encode(photo, "PNG")
    cases = [
        ("truncated JPEG (60 %)", "truncated.jpg", jpeg[: len(jpeg) * 6 // 10], "TruncatedImageError"),
        ("truncated progressive JPEG", "truncated-progressive.jpg",
         (lambda d: d[: len(d) // 2])(encode(photo, "JPEG", quality=90, progressive=True)), "TruncatedImageError"),
        ("truncated PNG (60 %)", "truncated.png", png[: len(png) * 6 // 10], "TruncatedImageError"),
        ("JPEG cut inside its header", "header-only.jpg", jpeg[:200], "TruncatedImageError"),
        ("PNG cut inside its header", "stub.png", png[:20], "TruncatedImageError"),
        ("zero-byte file", "empty.jpg", b"", "UnreadableImageError"),
        ("text file named .jpg", "notes.jpg", b"product list\nmilk, 1 l\n" * 20, "UnreadableImageError"),
        ("HTML error page named .jpg", "page.jpg", b"<!DOCTYPE html><html><body>502 Bad Gateway</body></html>", "UnreadableImageError"),
        ("HEIC (no decoder in Pillow)", "photo.heic",
         b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(2000), "UnreadableImageError"),
        ("PDF named .png", "scan.png", b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n", "UnreadableImageError"),
        ("1x1 tracking pixel PNG", "pixel.png", encode(Image.new("RGB", (1, 1)), "PNG"), "ImageTooSmallError"),
        ("1x1 GIF", "pixel.gif", encode(Image.new("P", (1, 1)), "GIF"), "ImageTooSmallError"),
        ("4000x8 strip", "strip.png", encode(Image.new("RGB", (4000, 8), (9, 9, 9)), "PNG"), "ImageTooSmallError"),
        ("20000x20000 PNG header, no data (bomb)", "bomb.png", png_header_only(20000, 20000), "ImageTooLargeError"),
        ("12000x12000 PNG header (over 100 MP, under Pillow's own limit)", "bomb12k.png",
         png_header_only(12000, 12000), "ImageTooLargeError"),
        ("65000x65000 JPEG header (bomb)", "bomb.jpg", _jpeg_with_size(65000, 65000), "ImageTooLargeError"),
        ("65535x65535 GIF (bomb)", "bomb.gif", _gif_with_size(65535, 65535), "ImageTooLargeError"),
        ("PNG data named .jpg", "really-png.jpg", png, OK),
        ("JPEG data named .png", "really-jpeg.png", jpeg, OK),
        ("16-bit greyscale PNG", "grey16.png",
         encode(Image.fromarray(np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (48, 1))), "PNG"), OK),
        ("CMYK JPEG", "cmyk.jpg", encode(Image.new("CMYK", (64, 48), (255, 0, 0, 0)), "JPEG", quality=95), OK),
        ("palette PNG with transparency", "palette.png", _palette_transparent(), OK),
        ("animated GIF (3 frames)", "anim.gif", _animated_gif(), OK),
        ("greyscale JPEG", "grey.jpg", encode(photo.convert("L"), "JPEG"), OK),
        ("greyscale+alpha PNG", "la.png", encode(photo.convert("LA"), "PNG"), OK),
        ("RGBA PNG, half transparent", "rgba.png", _rgba_half(), OK),
        ("1-bit PNG", "bilevel.png", encode(photo.convert("1"), "PNG"), OK),
        ("float TIFF", "float.tif", encode(Image.fromarray(np.full((48, 64), 0.5, np.float32)), "TIFF"), OK),
        ("WebP", "photo.webp", encode(photo, "WEBP"), OK),
        ("BMP", "photo.bmp", encode(photo, "BMP"), OK),
        ("EXIF orientation 9 (invalid)", "orient9.jpg", exif_jpeg(9, photo), OK),
        ("broken EXIF block", "badexif.jpg", exif_jpeg(b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x05\x01\x12", photo), OK),
    ]
    return cases


def _palette_transparent() -> bytes:
    img = Image.new("P", (64, 48), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * (254 * 3))
    img.paste(1, (32, 0, 64, 48))  # right half: red (index 1); left half: index 0, transparent
    return encode(img, "PNG", transparency=0)


def _rgba_half() -> bytes:
    a = np.zeros((48, 64, 4), np.uint8)
    a[:, 32:] = (255, 0, 0, 255)  # right half opaque red; left half fully transparent black
    return encode(Image.fromarray(a, "RGBA"), "PNG")


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (64, 48), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
