"""The whole pipeline through the public CLI on generated images:
train -> export (int8) -> enroll -> verify, and the int8 latents agree with Keras."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from .conftest import product_image

pytestmark = pytest.mark.slow


def cli(*args):
    proc = subprocess.run([sys.executable, "-m", "auditlens.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=600)
    return proc


def test_train_export_enroll_verify(tmp_path, generated_catalog):
    run = tmp_path / "run"
    trained = cli("train", generated_catalog, "--out", run, "--epochs", "2", "--steps-per-epoch", "3",
                  "--input-size", "48", "--latent-dim", "32", "--width", "8",
                  "--products-per-batch", "6", "--views-per-product", "2", "--quiet")
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert (run / "encoder.keras").is_file()
    report = json.loads((run / "report.json").read_text())
    assert report["config"]["seed"] == 0 and report["history"]

    tflite = tmp_path / "encoder.tflite"
    exported = cli("export", run / "encoder.keras", "--representative", generated_catalog, "--out", tflite)
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert "worst" in exported.stdout and tflite.stat().st_size < 1_000_000

    bundle = tmp_path / "bundle"
    enrolled = cli("enroll", generated_catalog, "--model", tflite, "--out", bundle, "--no-progress")
    assert enrolled.returncode == 0, enrolled.stderr[-3000:]

    # a "field photo" of product-1: the original, smaller and turned, on a grey background
    # with sensor noise (the original merely framed on grey is a copy of it: a RETAKE)
    photo = Image.new("RGB", (240, 240), (120, 124, 118))
    photo.paste(product_image(1).resize((150, 150)).rotate(9, expand=True, fillcolor=(120, 124, 118)), (35, 40))
    noisy = np.asarray(photo, np.float32) + np.random.default_rng(1).normal(0, 6, (240, 240, 3))
    photo = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
    photo.save(tmp_path / "photo.jpg", quality=88)
    verified = cli("verify", "--json", "--bundle", bundle, "--product", "product-1", tmp_path / "photo.jpg")
    assert verified.returncode in (0, 1), verified.stderr[-3000:]
    verdict = json.loads(verified.stdout)
    assert verdict["product_id"] == "product-1" and verdict["decision"] in ("match", "no_match")

    # int8 references agree with the Keras encoder's latents on the same preprocessed inputs
    import keras

    from auditlens.catalog import open_catalog
    from auditlens.device_app.bundle import ReferenceBundle
    from auditlens.device_app.preprocess import to_model_input

    b = ReferenceBundle.load(bundle)
    encoder = keras.saving.load_model(run / "encoder.keras", compile=False)
    inputs = np.stack([to_model_input(p.open(), b.spec) for p in open_catalog(generated_catalog)])
    keras_latents = np.asarray(encoder.predict(inputs.astype(np.float32), verbose=0))
    keras_latents /= np.linalg.norm(keras_latents, axis=1, keepdims=True)
    cosines = (keras_latents * b.references).sum(axis=1)
    assert cosines.min() > 0.95, cosines
