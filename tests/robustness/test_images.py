"""Hostile and broken images: each gives its specific ImageError or loads correctly, none
crashes the CLI (exit 2 with a one-line message, no traceback), none hangs."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import auditlens.errors as errors
from auditlens.cli import main
from auditlens.device_app.imaging import load_image

from .corpus import (
    OK,
    build_corpus,
    encode,
    exif_jpeg,
    png_header_only,
    product_image,
    quadrants,
    time_limit,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CORPUS = build_corpus()
IDS = [c[1] for c in CORPUS]

CLI_CORPUS = CORPUS


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    for _, name, data, _ in CORPUS:
        (folder / name).write_bytes(data)
    return folder


@pytest.mark.parametrize("case,name,data,expected", CORPUS, ids=IDS)
@pytest.mark.parametrize("as_path", [False, True], ids=["bytes", "path"])
def test_corpus_load_image(case, name, data, expected, as_path, corpus_dir):
    source = corpus_dir / name if as_path else data
    with time_limit(10, case):
        if expected == OK:
            image = load_image(source)
            assert image.mode == "RGB" and min(image.size) >= 16
        else:
            with pytest.raises(getattr(errors, expected)) as info:
                load_image(source)
            message = str(info.value)
            assert len(message) > 20
            if as_path:
                assert name in message  # the message names the file


def test_truncated_and_bomb_messages_say_what_to_do():
    by_name = {c[1]: c[2] for c in CORPUS}
    with pytest.raises(errors.TruncatedImageError, match="copy or upload the photo again"):
        load_image(by_name["truncated.jpg"])
    with pytest.raises(errors.ImageTooLargeError, match="12000x12000 pixels is more than"):
        load_image(by_name["bomb12k.png"])


REPO = Path(__file__).resolve().parents[2]
BOMB_CHILD = """
import sys
from auditlens import errors
from auditlens.device_app.imaging import load_image
from tests.robustness.corpus import png_header_only
for side in (20000, 12000, 65535):
    try:
        load_image(png_header_only(side, side))
    except errors.ImageTooLargeError:
        continue
    sys.exit(f"a {side}x{side} header was not refused")
print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the peak memory from /proc")
def test_bomb_refused_before_decoding():
    """A 20000x20000 header must be refused from its header: no 1.2 GB allocation. Run in a
    fresh process, whose peak memory (VmHWM) no earlier test has raised already."""
    with time_limit(60, "bomb"):
        child = subprocess.run([sys.executable, "-c", BOMB_CHILD], cwd=REPO, capture_output=True,
                               text=True)
    assert child.returncode == 0, child.stderr[-2000:]
    assert int(child.stdout.split()[-1]) / 1024 < 300  # python, numpy and Pillow: about 60 MiB


def test_a_bomb_beyond_pillows_own_limit_gets_the_same_advice():
    """Pillow refuses 30000x30000 inside Image.open, before auditlens's check: the message
    still names auditlens's limit and what to do, not Pillow's 'DOS attack' text."""
    with pytest.raises(errors.ImageTooLargeError,
                       match=r"900,000,000 pixels is more than the 100,000,000 allowed; resize the photo"):
        load_image(png_header_only(30000, 30000))
    with pytest.raises(errors.ImageTooLargeError, match=r"900,000,000 pixels is more than Pillow opens"):
        load_image(png_header_only(30000, 30000), max_pixels=10**10)


def test_max_pixels_is_enforced_per_call():
    data = encode(Image.new("RGB", (300, 300), (50, 90, 10)), "PNG")
    with pytest.raises(errors.ImageTooLargeError):
        load_image(data, max_pixels=300 * 300 - 1)
    assert load_image(data, max_pixels=300 * 300).size == (300, 300)


# -- correct loads: the pixels are what a viewer shows -------------------------------------
def _by_name(name):
    return next(c[2] for c in CORPUS if c[1] == name)


def test_16bit_png_is_scaled_not_clipped():
    a = np.asarray(load_image(_by_name("grey16.png")))
    assert a[0, 0].tolist() == [0, 0, 0]
    assert a[0, -1].tolist() == [255, 255, 255]
    assert 100 < a[0, 32, 0] < 160  # the middle of the 16-bit ramp is mid-grey, not white


def _float_tiff(values: np.ndarray) -> bytes:
    return encode(Image.fromarray(values.astype(np.float32), "F"), "TIFF")


def test_float_tiff_in_0_1_is_scaled_not_black():
    a = np.asarray(load_image(_float_tiff(np.full((32, 48), 0.5))))
    assert (a == 128).all()  # mid grey, not black (a RETAKE "too dark")
    ramp = np.asarray(load_image(_float_tiff(np.tile(np.linspace(0, 1, 48), (32, 1)))))
    assert ramp[0, 0, 0] == 0 and ramp[0, -1, 0] == 255
    # a float image beyond 0..1 keeps the 0..255 scale
    assert (np.asarray(load_image(_float_tiff(np.full((32, 48), 128.0)))) == 128).all()


def test_float_array_overshooting_0_1_keeps_the_0_1_scale():
    # a bicubic resize or a normalisation leaves a 0..1 image a little outside 0..1: one
    # such pixel must not switch the whole image to 0..255 (nearly black, a false RETAKE)
    from auditlens.device_app.imaging import image_from_array

    ramp = np.tile(np.linspace(0, 1, 48), (32, 1))
    clean = np.asarray(image_from_array(ramp))
    for odd in (1.02, -0.01):
        values = ramp.copy()
        values[5, 5] = odd
        got = np.array(image_from_array(values))
        assert got[5, 5] == (255 if odd > 1 else 0)  # clipped
        got[5, 5] = clean[5, 5]
        assert (got == clean).all()
    # a 0..255 float image keeps its scale
    assert (np.asarray(image_from_array(np.full((32, 48), 128.0))) == 128).all()


def test_float_tiff_with_nan_and_inf_pixels(recwarn):
    values = np.full((32, 48), 0.5)
    values[0, 0], values[0, 1], values[0, 2] = np.nan, np.inf, -np.inf
    a = np.asarray(load_image(_float_tiff(values)))
    assert a[0, :3, 0].tolist() == [0, 255, 0]
    assert (a[1:] == 128).all()  # the finite values still read as 0..1
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
    all_nan = np.asarray(load_image(_float_tiff(np.full((32, 48), np.nan))))
    assert (all_nan == 0).all()


def _webp(lossless: bool = False) -> bytes:
    return encode(product_image(4, (96, 80)), "WEBP", lossless=lossless)


@pytest.mark.parametrize("lossless", [False, True], ids=["lossy", "lossless"])
@pytest.mark.parametrize("kind", ["bytes", "path", "stream"])
def test_truncated_webp_says_the_file_is_cut_off(lossless, kind, tmp_path):
    data = _webp(lossless)
    for cut in (len(data) // 2, 40, 12):
        part = data[:cut]
        if kind == "path":
            source = tmp_path / "cut.webp"
            source.write_bytes(part)
        else:
            source = part if kind == "bytes" else io.BytesIO(part)
        with pytest.raises(errors.TruncatedImageError, match="cut off.*copy or upload the photo again"):
            load_image(source)


def test_complete_but_corrupt_webp_is_not_called_truncated():
    data = bytearray(_webp())
    data[12:16] = b"XXXX"  # an unknown first chunk, the RIFF size still right
    with pytest.raises(errors.UnreadableImageError) as info:
        load_image(bytes(data))
    assert not isinstance(info.value, errors.TruncatedImageError)
    assert load_image(_webp() + b"trailing junk").size == (96, 80)


def test_very_thin_image_has_defined_quality(recwarn):
    from auditlens.device_app.quality import assess

    for size in [(20000, 16), (16, 20000), (5000, 16)]:
        quality = assess(Image.effect_noise(size, 60).convert("RGB"))
        assert all(np.isfinite(v) for v in (quality.brightness, quality.clipped,
                                            quality.sharpness, quality.centre_detail))
        assert quality.sharpness == 0.0 and quality.issues[0].startswith("too narrow:")
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
    ok = assess(Image.effect_noise((1200, 16), 60).convert("RGB"))  # 256x3: still measurable
    assert ok.sharpness > 8 and not any(i.startswith("too narrow") for i in ok.issues)


def test_cli_verify_json_on_a_very_thin_image(bundle_dir, tmp_path, capsys, recwarn):
    import json

    photo = tmp_path / "thin.png"
    Image.effect_noise((20000, 16), 60).convert("RGB").save(photo)
    with time_limit(60, "auditlens verify --json thin.png"):
        rc = main(["verify", "--bundle", str(bundle_dir), "--product", "product-0", "--json", str(photo)])
    out, err = capsys.readouterr()
    assert rc == 3, err

    def no_nan(constant):
        raise AssertionError(f"invalid JSON constant {constant}")

    verdict = json.loads(out, parse_constant=no_nan)
    assert verdict["quality"]["sharpness"] == 0.0
    assert any(r.startswith("too narrow: a 20000x16 photo") for r in verdict["reasons"])
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_cmyk_jpeg_colours():
    r, g, b = np.asarray(load_image(_by_name("cmyk.jpg")))[24, 32].tolist()
    assert r < 60 and g > 200 and b > 200  # pure cyan ink shows cyan


@pytest.mark.parametrize("name", ["palette.png", "rgba.png"])
def test_transparency_composited_on_white(name):
    a = np.asarray(load_image(_by_name(name))).astype(int)
    assert (a[:, :28] >= 250).all()  # transparent half: white, not black
    assert (np.abs(a[:, 36:] - [255, 0, 0]) <= 3).all()  # opaque half: red


@pytest.mark.parametrize("mode", ["La", "RGBa"])
def test_premultiplied_alpha_images_are_composited_on_white(mode):
    """Pillow images with premultiplied alpha (a caller's own decoding): half transparent,
    half opaque grey (or red); Pillow converts "La" to "LA" only, not to RGBA directly."""
    straight = Image.new("LA" if mode == "La" else "RGBA", (64, 48), 0)
    ink = (128, 255) if mode == "La" else (255, 0, 0, 255)
    straight.paste(ink, (32, 0, 64, 48))
    a = np.asarray(load_image(straight.convert(mode))).astype(int)
    assert (a[:, :28] >= 250).all()  # transparent half: white
    expected = [128, 128, 128] if mode == "La" else [255, 0, 0]
    assert (np.abs(a[:, 36:] - expected) <= 3).all()


def test_animated_gif_first_frame():
    a = np.asarray(load_image(_by_name("anim.gif"))).astype(int)
    assert (np.abs(a[20, 20] - [255, 0, 0]) <= 8).all()


def test_wrong_extension_loads_by_content():
    assert load_image(_by_name("really-png.jpg")).size == (400, 300)
    assert load_image(_by_name("really-jpeg.png")).size == (400, 300)


QUADRANT_COLOURS = {"tl": (255, 0, 0), "tr": (0, 255, 0), "bl": (0, 0, 255), "br": (255, 255, 255)}


def _assert_upright(image: Image.Image, width: int = 96, height: int = 64):
    assert image.size == (width, height)
    a = np.asarray(image).astype(int)
    centres = {"tl": a[height // 4, width // 4], "tr": a[height // 4, 3 * width // 4],
               "bl": a[3 * height // 4, width // 4], "br": a[3 * height // 4, 3 * width // 4]}
    for quadrant, colour in QUADRANT_COLOURS.items():
        assert (np.abs(centres[quadrant] - colour) <= 40).all(), (quadrant, centres[quadrant].tolist())


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_upright(orientation):
    """The stored pixels are laid out per the EXIF definition of each orientation; the
    loaded image must come out upright (red marker top-left, 96 wide, 64 high)."""
    data = exif_jpeg(orientation, quadrants())
    stored = Image.open(io.BytesIO(data))
    if orientation >= 5:
        assert stored.size == (64, 96)  # stored sideways
    _assert_upright(load_image(data))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_upright_with_draft(orientation):
    """Reduced JPEG decoding (what the device uses) keeps the orientation right."""
    big = quadrants(384, 256)
    image = load_image(exif_jpeg(orientation, big), draft=(96, 96))
    w, h = image.size
    assert w > h and w >= 96  # landscape again, and no smaller than asked
    _assert_upright(image, w, h)


# -- the CLI never crashes ----------------------------------------------------------------
@pytest.mark.parametrize("case,name,data,expected", CLI_CORPUS, ids=IDS)
def test_cli_verify_on_corpus(case, name, data, expected, corpus_dir, bundle_dir, capsys):
    with time_limit(30, f"auditlens verify {name}"):
        rc = main(["verify", "--bundle", str(bundle_dir), "--product", "product-0", str(corpus_dir / name)])
    out, err = capsys.readouterr()
    # the test bundle is unsigned (and, with a model without its card, uncalibrated): verify
    # says so first, each warning on its own line
    assert err.startswith("auditlens: warning: the bundle is not signed")
    err = "".join(line for line in err.splitlines(keepends=True)
                  if not line.startswith("auditlens: warning: the bundle"))
    if expected == OK:
        assert rc in (0, 1, 3), err
        assert out.split()[0] in ("MATCH", "NO", "RETAKE")
    else:
        assert rc == 2
        assert err.startswith("auditlens: error: ") and name in err
        assert "Traceback" not in err and len(err.splitlines()) <= 2


def test_cli_subprocess_bad_photos(corpus_dir, bundle_dir):
    """The installed command, end to end: exit 2, a message, no traceback, no hang."""
    for name in ("bomb.png", "truncated.jpg", "notes.jpg", "photo.heic"):
        proc = subprocess.run(
            [sys.executable, "-m", "auditlens.cli", "verify", "--bundle", str(bundle_dir),
             "--product", "product-0", str(corpus_dir / name)],
            capture_output=True, text=True, timeout=120,
        )
        assert proc.returncode == 2, proc.stderr
        assert "auditlens: error:" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_missing_photo_and_unknown_product(corpus_dir, bundle_dir, capsys):
    assert main(["verify", "--bundle", str(bundle_dir), "--product", "product-0",
                 str(corpus_dir / "does-not-exist.jpg")]) == 2
    assert "no such image file" in capsys.readouterr().err
    assert main(["verify", "--bundle", str(bundle_dir), "--product", "no-such-product",
                 str(corpus_dir / "really-png.jpg")]) == 2
    assert "not in this bundle" in capsys.readouterr().err
    fifo = corpus_dir / "pipe.jpg"
    if not fifo.exists():
        os.mkfifo(fifo)
    for special in ("/dev/zero", str(fifo), str(corpus_dir)):  # endless, blocking, a folder
        with time_limit(10, special):
            assert main(["verify", "--bundle", str(bundle_dir), "--product", "product-0", special]) == 2
        assert "auditlens: error:" in capsys.readouterr().err


@pytest.mark.parametrize("with_empty", [False, True],
                         ids=["corpus", "corpus+empty"])
def test_cli_score_over_corpus(corpus_dir, bundle_dir, tmp_path, capsys, with_empty):
    """Batch scoring goes on past bad photos: one row per pair, errors named, exit 2."""
    corpus = [c for c in CORPUS if with_empty or c[1] != "empty.jpg"]
    pairs = tmp_path / "pairs.csv"
    with pairs.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["photo", "product_id"])
        for _, name, _, _ in corpus:
            w.writerow([str(corpus_dir / name), "product-1"])
    out = tmp_path / "scores.csv"
    with time_limit(120, "auditlens score"):
        rc = main(["score", "--bundle", str(bundle_dir), "--pairs", str(pairs), "--out", str(out), "--no-progress"])
    assert rc == 2
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == len(corpus)
    for row, (_, name, _, expected) in zip(rows, corpus, strict=True):
        assert row["photo"].endswith(name)
        if expected == OK:
            assert row["verdict"] in ("match", "no_match", "retake"), row
        else:
            assert row["verdict"] == "error" and row["error"], row


def test_failed_loads_leave_no_file_open(corpus_dir):
    """Every error keeps its traceback (and so the decoder's frame) alive; the file it
    opened must be closed anyway, or a batch of bad originals runs out of descriptors."""
    import os

    kept = []
    before = len(os.listdir("/proc/self/fd"))
    for _, name, _, _ in CORPUS:
        try:
            kept.append(load_image(corpus_dir / name))
        except errors.ImageError as exc:
            kept.append(exc)
    assert len(os.listdir("/proc/self/fd")) == before
    assert len(kept) == len(CORPUS)


def test_the_pixel_limit_counts_what_a_drafted_jpeg_decodes():
    # A 108 MP phone JPEG read with a draft size decodes at 1/8 scale: the limit is on the
    # pixels decoded, so it passes where the same pixels as a PNG (decoded whole) do not.
    photo = Image.new("RGB", (2000, 1500), (120, 60, 30))
    jpeg, png = encode(photo, "JPEG"), encode(photo, "PNG")
    limit = 1_000_000  # below the photo's 3 MP, above its 500x375 drafted decode
    assert load_image(jpeg, max_pixels=limit, draft=(256, 256)).size == (500, 375)
    with pytest.raises(errors.ImageTooLargeError, match="2000x1500 pixels is more than the 1,000,000"):
        load_image(jpeg, max_pixels=limit)  # no draft: decoded whole
    with pytest.raises(errors.ImageTooLargeError, match="2000x1500 pixels"):
        load_image(png, max_pixels=limit, draft=(256, 256))
    # drafted, yet still over the limit: the message gives the size decoded, which the
    # limit is on (it quoted only the file's size, which a larger limit then let through)
    with pytest.raises(errors.ImageTooLargeError, match=r"2000x1500 pixels \(decoded at 500x375\) is more than "
                                                        "the 100,000"):
        load_image(jpeg, max_pixels=100_000, draft=(256, 256))


def test_a_heic_photo_is_named_as_such_with_what_to_do():
    # An iPhone's default HEIC, where no HEIF decoder is installed: not "not a readable image".
    heic = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(200)
    with pytest.raises(errors.UnreadableImageError, match="a HEIC/HEIF or AVIF photo, which this "
                       "installation cannot decode; set the camera to JPEG"):
        load_image(heic)
    with pytest.raises(errors.UnreadableImageError, match="not a readable image"):
        load_image(b"\x00\x00\x00\x18ftypisom" + bytes(200))  # an MP4 video is not a photo


def test_a_capture_handed_over_as_bytes_is_named_in_errors(sample_bundle):
    from auditlens.device_app.verifier import Verifier

    verifier = Verifier(sample_bundle)
    cut = (sample_bundle.parent / "sample" / "photos" / "Banana_001.jpg").read_bytes()[:300]
    for given in (cut, io.BytesIO(cut)):
        with pytest.raises(errors.TruncatedImageError, match=r"^the photo \(300 bytes\): the file ends"):
            verifier.prepare(given)


def test_pillows_warnings_about_a_photo_stay_inside_the_loader():
    """A JPEG whose EXIF block is cut short makes Pillow warn ("Corrupt EXIF data") as it
    reads it: the loader keeps that quiet, so a service that turns warnings into errors
    gets the photo (or auditlens' own ImageError), never a UserWarning."""
    import warnings

    photo = Path(__file__).resolve().parents[2] / "models" / "sample" / "photos" / "Banana_001.jpg"
    buf = io.BytesIO()
    Image.open(photo).save(buf, "JPEG", exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x05"
                                                   b"\x01\x12\x00\x03\x00\x00\x00\x01\x00\x01")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Image.open(io.BytesIO(buf.getvalue())).getexif().get_ifd(0x8769)
        assert any("Corrupt EXIF" in str(w.message) for w in caught)  # Pillow does warn
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(io.BytesIO(buf.getvalue())).size == (348, 348)
