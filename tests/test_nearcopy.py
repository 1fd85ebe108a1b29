"""A photo that merely copies the catalogue original (framed, letterboxed, on a
screenshot's canvas with its bars) is sent back for a RETAKE; photos of products are not."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageOps

from auditlens.catalog import read_labelled_photos
from auditlens.datasets import import_grocery
from auditlens.device_app.imaging import load_image
from auditlens.device_app.nearcopy import dhash, hamming, trimmed_boxes, trimmed_hashes
from auditlens.device_app.quality import analysis_copy
from auditlens.device_app.verifier import RETAKE, Verifier, VerifierOptions

from .conftest import SAMPLE

PRODUCTS = sorted(p.stem for p in (SAMPLE / "originals").glob("*.jpg"))


def _screenshot(original: Image.Image, canvas, *, bars: bool) -> Image.Image:
    """The original full-width on a phone's 1080x1920 screen, with a status bar, a title
    and navigation buttons when ``bars``."""
    w, h = original.size
    screen = Image.new("RGB", (1080, 1920), canvas)
    screen.paste(original.resize((1000, round(1000 * h / w))), (40, 420))
    if bars:
        ink = (235, 235, 235) if sum(canvas) < 384 else (40, 40, 40)
        d = ImageDraw.Draw(screen)
        d.text((30, 20), "12:30", fill=ink, font_size=48)
        for i in range(3):
            d.rectangle((960 - 50 * i, 25, 990 - 50 * i, 65), fill=ink)
            d.ellipse((270 * (i + 1) - 30, 1810, 270 * (i + 1) + 30, 1870), outline=ink, width=6)
        d.text((30, 120), "< Gallery      IMG_2041.jpg", fill=ink, font_size=44)
    return screen


COPIES = {
    "dark frame": lambda im: ImageOps.expand(im, 40, (30, 30, 30)),
    "thin grey border": lambda im: ImageOps.expand(im, 10, (200, 200, 200)),
    "black screen": lambda im: _screenshot(im, (0, 0, 0), bars=False),
    "dark screenshot with bars": lambda im: _screenshot(im, (0, 0, 0), bars=True),
    "light-grey screen": lambda im: _screenshot(im, (225, 225, 225), bars=False),
    "pillarboxed": lambda im: ImageOps.pad(im, (1920, 1080), color=(0, 0, 0)),
}


def _jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=85)
    return buf.getvalue()


@pytest.fixture(scope="module")
def verifier(sample_bundle):
    return Verifier(sample_bundle)


@pytest.mark.parametrize("how", sorted(COPIES))
def test_a_framed_or_screenshot_copy_of_the_original_asks_for_a_retake(verifier, how):
    """Each sample original, so presented and re-encoded: the whole frame's dHash no
    longer matches (they scored up to 0.99, a MATCH, before the borders were trimmed)."""
    for product in PRODUCTS:
        original = Image.open(SAMPLE / "originals" / f"{product}.jpg").convert("RGB")
        copy = _jpeg(COPIES[how](original))
        verdict = verifier.verify(copy, product)
        assert verdict.decision == RETAKE and verdict.near_duplicate, (product, how, verdict.score)
        assert "reproduces the catalogue original" in verdict.reasons[0]
        whole = hamming(dhash(analysis_copy(load_image(io.BytesIO(copy)))),
                        verifier.bundle.product(product).dhash)
        if how not in ("thin grey border",):
            assert whole > VerifierOptions().near_duplicate_bits, (product, how)


def test_the_sample_photos_are_not_taken_for_copies(verifier, sample_photos):
    for photo in sample_photos:
        verdict = verifier.verify(photo.photo, photo.product_id)
        assert not verdict.near_duplicate and verdict.decision != RETAKE, photo.photo


def test_a_picture_without_a_plain_border_keeps_its_whole_frame(sample_photos):
    """A field photo has no plain border to trim; a frame is trimmed to the picture."""
    photo = analysis_copy(load_image(sample_photos[0].photo))
    assert trimmed_boxes(photo) == []
    framed = Image.new("L", (200, 100), 0)
    picture = np.random.default_rng(0).integers(60, 200, (60, 120), dtype=np.uint8)
    framed.paste(Image.fromarray(picture), (50, 20))
    assert trimmed_boxes(framed)[0] == (51, 21, 169, 79)  # less the blended line
    assert trimmed_boxes(Image.new("L", (50, 50), 128)) == []  # all border: nothing inside


def test_a_bundle_without_box_hashes_still_catches_a_framed_copy(tmp_path, sample_bundle):
    """Bundles enrolled before the originals' trimmed hashes were kept: the photo's own
    trimmed frame still meets the original's whole-frame dHash."""
    import shutil

    from .test_bundle import _rehashed

    old = tmp_path / "old"
    shutil.copytree(sample_bundle, old)
    products = json.loads((old / "products.json").read_text())
    for entry in products:
        del entry["box_dhashes"]
    _rehashed(old, "products.json", json.dumps(products).encode())
    verifier = Verifier(old)
    assert all(not verifier.bundle.product(p).box_dhashes for p in PRODUCTS)
    original = Image.open(SAMPLE / "originals" / "Banana.jpg").convert("RGB")
    assert verifier.verify(_jpeg(COPIES["dark screenshot with bars"](original)), "Banana").near_duplicate


def test_the_originals_hashes_are_in_the_bundle(verifier):
    """Enrolment keeps the trimmed hashes of each original (its studio background)."""
    for product in PRODUCTS:
        record = verifier.bundle.product(product)
        original = analysis_copy(load_image(SAMPLE / "originals" / f"{product}.jpg"))
        assert record.box_dhashes == trimmed_hashes(original) != ()


def test_no_grocery_photo_is_taken_for_a_copy_of_any_original(grocery, tmp_path):
    """Every photo of grocery-dev (2,271, train and val) against every original: none
    comes within the near-copy bits of any original's hashes, so no genuine photo is
    sent back as a copy (measured: the nearest is 9 bits away)."""
    written = import_grocery(grocery, tmp_path)
    from auditlens.catalog import open_catalog

    originals = []
    for product in open_catalog(written["catalog"]):
        small = analysis_copy(product.open())
        originals += [dhash(small), *trimmed_hashes(small)]
    bits = VerifierOptions().near_duplicate_bits
    nearest = 64
    for split in ("train", "val"):
        for photo in read_labelled_photos(written[split]):
            small = analysis_copy(load_image(photo.photo))
            for h in (dhash(small), *trimmed_hashes(small)):
                nearest = min(nearest, *(hamming(h, o) for o in originals))
    assert nearest > bits + 2
