"""Fixtures of the robustness suite: a model, a small generated catalogue and its bundle,
a key pair, and a hang guard.

The model is the shipped ``models/encoder.tflite``; where it is absent, the model inside
the shipped ``models/sample_bundle``. ``AUDITLENS_TEST_MODEL=/path/enc.tflite`` overrides
both (development against a provisional model).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from .corpus import product_image

REPO = Path(__file__).resolve().parents[2]
MODELS = REPO / "models"


def _model_candidates() -> list[Path]:
    env = os.environ.get("AUDITLENS_TEST_MODEL")
    if env:
        return [Path(env)]
    return [MODELS / "encoder.tflite", MODELS / "sample_bundle" / "model.tflite"]


@pytest.fixture(scope="session")
def model_path(tmp_path_factory) -> Path:
    """A TFLite encoder copied into a temp folder, with its model card if there is one."""
    for candidate in _model_candidates():
        if candidate.is_file() and candidate.stat().st_size > 0:
            folder = tmp_path_factory.mktemp("model")
            target = folder / "encoder.tflite"
            shutil.copyfile(candidate, target)
            for card in (candidate.with_suffix(".json"), candidate.with_name(candidate.name + ".json")):
                if card.is_file():
                    shutil.copyfile(card, folder / "encoder.json")
                    break
            return target
    pytest.skip("no encoder model: neither models/encoder.tflite nor models/sample_bundle/model.tflite")


@pytest.fixture(scope="session")
def catalog_dir(tmp_path_factory) -> Path:
    """Six generated originals in a folder catalogue (file stem = product id)."""
    folder = tmp_path_factory.mktemp("catalog")
    for i in range(6):
        product_image(i).save(folder / f"product-{i}.jpg", quality=92)
    return folder


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory, catalog_dir, model_path) -> Path:
    """A bundle folder enrolled from :func:`catalog_dir` (treat as read-only: copy it)."""
    from auditlens.catalog import open_catalog
    from auditlens.export.enroll import EnrollOptions, enroll

    out = tmp_path_factory.mktemp("bundles") / "bundle"
    enroll(open_catalog(catalog_dir), out, model=model_path,
           options=EnrollOptions(progress=False, workers=1, num_threads=1))
    return out


@pytest.fixture(scope="session")
def keypair(tmp_path_factory) -> tuple[Path, Path]:
    pytest.importorskip("cryptography")
    from auditlens.device_app.signing import generate_keypair

    return generate_keypair(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="session")
def signed_bundle(tmp_path_factory, catalog_dir, model_path, keypair) -> Path:
    from auditlens.catalog import open_catalog
    from auditlens.export.enroll import EnrollOptions, enroll

    out = tmp_path_factory.mktemp("signed") / "signed.zip"
    enroll(open_catalog(catalog_dir), out, model=model_path,
           options=EnrollOptions(progress=False, workers=1, num_threads=1),
           signing_key=keypair[0].read_bytes())
    return out


@pytest.fixture
def bundle_copy(tmp_path, bundle_dir) -> Path:
    """A private, writable copy of the bundle folder."""
    target = tmp_path / "bundle"
    shutil.copytree(bundle_dir, target)
    return target


