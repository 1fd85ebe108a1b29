"""Shared fixtures: the shipped model and sample, generated catalogues, and the
grocery-dev data when it sits beside the repository."""

from __future__ import annotations

import csv
import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]

needs_signing = pytest.mark.skipif(
    importlib.util.find_spec("cryptography") is None,
    reason="signing needs the [sign] extra (cryptography), which is not installed")
"""For tests that make keys or sign bundles: they skip, with that reason, without it."""
MODELS = REPO / "models"
SAMPLE = MODELS / "sample"
GROCERY = REPO.parent / "shared" / "data" / "grocery-dev"


@pytest.fixture(scope="session")
def shipped_model() -> Path:
    return MODELS / "encoder.tflite"


@pytest.fixture(scope="session")
def sample_bundle() -> Path:
    return MODELS / "sample_bundle"


@pytest.fixture(scope="session")
def sample_photos() -> list:
    from auditlens.catalog import read_labelled_photos

    return read_labelled_photos(SAMPLE / "photos.csv")


@pytest.fixture(scope="session")
def grocery() -> Path:
    if not (GROCERY / "classes.csv").is_file():
        pytest.skip(f"needs the grocery-dev data set at {GROCERY} (not part of the repository)")
    return GROCERY


def product_image(seed: int, size: int = 160) -> Image.Image:
    """A synthetic 'product': a coloured shape with a label stripe on white."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (size, size), (255, 255, 255))
    d = ImageDraw.Draw(img)
    colour = tuple(int(c) for c in rng.integers(0, 230, 3))
    accent = tuple(int(c) for c in rng.integers(0, 255, 3))
    m = size // 6
    if seed % 2:
        d.rectangle([m, m, size - m, size - m], fill=colour)
    else:
        d.ellipse([m, m, size - m, size - m], fill=colour)
    y = int(rng.integers(2 * m, 4 * m))
    d.rectangle([m, y, size - m, y + m // 2], fill=accent)
    return img


@pytest.fixture
def generated_catalog(tmp_path) -> Path:
    """A folder catalogue of 6 synthetic products (file stem = product id)."""
    folder = tmp_path / "originals"
    folder.mkdir()
    for i in range(6):
        product_image(i).save(folder / f"product-{i}.png")
    return folder


@pytest.fixture
def sample_copy(tmp_path) -> Path:
    """A writable copy of the shipped sample catalogue and photos."""
    dst = tmp_path / "sample"
    shutil.copytree(SAMPLE, dst)
    return dst


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path
