"""One preprocessing path: enrolment (export side) and the device produce identical
encoder inputs for the same image, and JPEG draft decoding stays close to full decoding."""

import numpy as np
from PIL import Image

from auditlens.catalog import open_catalog
from auditlens.device_app.imaging import load_image
from auditlens.device_app.preprocess import (
    PreprocessSpec,
    crop_box,
    load_model_input,
    to_model_input,
)
from auditlens.device_app.verifier import Verifier
from auditlens.export.enroll import _load_original

from .conftest import SAMPLE


def test_enrolment_and_device_inputs_are_identical(sample_bundle):
    verifier = Verifier(sample_bundle)
    product = open_catalog(SAMPLE / "catalog.csv").get("Banana")
    enrolled = _load_original(product, verifier.spec, 64).model_input
    device = verifier.prepare(product.image).model_input
    np.testing.assert_array_equal(enrolled, device)
    assert device.dtype == np.uint8 and device.shape == (verifier.spec.input_size,) * 2 + (3,)


def test_center_crop_box():
    assert crop_box((400, 300), "center") == (50, 0, 350, 300)
    assert crop_box((300, 400), "center") == (0, 50, 300, 350)
    assert crop_box((400, 300), "full") == (0, 0, 400, 300)


def test_draft_decoding_of_a_big_jpeg_stays_close(tmp_path):
    spec = PreprocessSpec(96)
    big = Image.open(SAMPLE / "photos" / "Banana_001.jpg").resize((3000, 3000), Image.Resampling.BICUBIC)
    path = tmp_path / "big.jpg"
    big.save(path, quality=92)
    fast = load_model_input(path, spec).astype(np.float32)
    full = to_model_input(load_image(path), spec).astype(np.float32)
    assert np.abs(fast - full).mean() < 3.0
