"""Property-based fuzzing of the two loaders that read untrusted bytes.

* ``load_image``: valid images of every accepted container, then mutated (bytes flipped,
  overwritten with extreme values, cut, spliced, duplicated) or plain random bytes; the
  only exceptions allowed out are :class:`ImageError` subclasses.
* ``ReferenceBundle.load``: a real bundle (folder and zip) with bytes of its manifest,
  products, references or of the zip itself mutated, or manifest JSON values replaced;
  the only exceptions allowed out are :class:`BundleError` subclasses.

Bounded for CI: ``AUDITLENS_FUZZ_EXAMPLES`` (default 300 per loader and per seed set)
sets the number of examples; each example has a deadline.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from auditlens.device_app.bundle import ReferenceBundle
from auditlens.device_app.imaging import load_image
from auditlens.errors import BundleError, ImageError

from .corpus import encode, exif_jpeg, product_image, time_limit

EXAMPLES = int(os.environ.get("AUDITLENS_FUZZ_EXAMPLES", "300"))

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
FUZZ_MAX_PIXELS = 4_000_000
"""The fuzz keeps decoded sizes small so each example is fast; the size guard itself is
the same code at any limit (the default limit is tried in test_images.py)."""

fuzz_settings = settings(
    max_examples=EXAMPLES, deadline=2000, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.function_scoped_fixture],
)


def _seeds() -> list[bytes]:
    photo = product_image(3, (48, 40))
    a = np.asarray(photo)
    return [
        encode(photo, "JPEG", quality=80),
        encode(photo, "JPEG", quality=80, progressive=True),
        exif_jpeg(6, photo),
        encode(photo, "PNG"),
        encode(Image.fromarray(a[..., 0].astype(np.uint16) * 257), "PNG"),
        encode(photo.convert("RGBA"), "PNG"),
        encode(photo.convert("P"), "PNG", transparency=0),
        encode(photo.convert("P"), "GIF"),
        encode(photo, "GIF", save_all=True, append_images=[photo.rotate(90)]),
        encode(photo, "WEBP", quality=70),
        encode(photo, "BMP"),
        encode(photo, "TIFF"),
        encode(photo, "TIFF", compression="tiff_deflate"),
        encode(Image.new("CMYK", (40, 32), (10, 200, 30, 5)), "JPEG"),
    ]


SEEDS = _seeds()
SEED_NAMES = ["jpeg", "progressive", "exif6", "png", "png16", "rgba", "palette", "gif",
              "anim-gif", "webp", "bmp", "tiff", "tiff-deflate", "cmyk"]


@st.composite
def mutated(draw, seeds: list[bytes]) -> bytes:
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(["flip", "set", "cut", "insert", "delete", "dup", "extreme"]))
        if not data:
            break
        # mutations cluster near the start, where the headers are
        pos = draw(st.one_of(st.integers(0, min(len(data) - 1, 64)), st.integers(0, len(data) - 1)))
        if op == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[pos] = draw(st.integers(0, 255))
        elif op == "extreme":
            n = min(4, len(data) - pos)
            data[pos:pos + n] = draw(st.sampled_from([b"\xff", b"\x00", b"\x7f"])) * n
        elif op == "cut":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 32))]
        elif op == "dup":
            data[pos:pos] = data[pos:pos + draw(st.integers(1, 64))]
    return bytes(data)


def _load_only_image_errors(data: bytes) -> None:
    with time_limit(20, "load_image"):
        try:
            image = load_image(data, max_pixels=FUZZ_MAX_PIXELS)
        except ImageError:
            return
    assert image.mode == "RGB"
    assert min(image.size) >= 16


@fuzz_settings
@given(mutated(SEEDS))
def test_load_image_mutated_valid_images(data):
    _load_only_image_errors(data)


@fuzz_settings
@given(mutated(SEEDS))
def test_load_image_mutated_with_draft(data):
    """The device decodes with ``draft`` (reduced JPEG decoding): the same guarantee holds."""
    with time_limit(20, "load_image"):
        try:
            image = load_image(data, max_pixels=FUZZ_MAX_PIXELS, draft=(192, 192))
        except ImageError:
            return
    assert image.mode == "RGB"


@settings(fuzz_settings, max_examples=max(EXAMPLES // 3, 20))
@given(st.one_of(
    st.binary(max_size=512),
    st.sampled_from([b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"RIFF\x00\x00\x00\x00WEBP",
                     b"BM", b"II*\x00", b"MM\x00*"]).flatmap(
        lambda magic: st.binary(max_size=512).map(lambda tail: magic + tail)),
))
def test_load_image_random_bytes(data):
    _load_only_image_errors(data)


# -- bundles ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundle_zip_bytes(bundle_dir, tmp_path_factory) -> bytes:
    out = tmp_path_factory.mktemp("fuzzzip") / "b.zip"
    with zipfile.ZipFile(out, "w") as zf:
        for p in sorted(bundle_dir.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(bundle_dir).as_posix())
    return out.read_bytes()


def _load_only_bundle_errors(path: Path) -> None:
    with time_limit(20, "ReferenceBundle.load"):
        try:
            ReferenceBundle.load(path)
        except BundleError:
            pass


@fuzz_settings
@given(data=st.data())
def test_bundle_zip_mutated(tmp_path_factory, bundle_zip_bytes, data):
    blob = data.draw(mutated([bundle_zip_bytes]))
    path = tmp_path_factory.mktemp("z", numbered=True) / "b.zip"
    path.write_bytes(blob)
    _load_only_bundle_errors(path)


MUTABLE = ["manifest.json", "products.json", "references.npy"]


@fuzz_settings
@given(data=st.data())
def test_bundle_folder_files_mutated(tmp_path_factory, bundle_dir, data):
    """Mutate one file's bytes; for products/references also re-hash the manifest, so the
    mutation reaches the parsers behind the integrity check."""
    root = tmp_path_factory.mktemp("f", numbered=True) / "b"
    shutil.copytree(bundle_dir, root)
    name = data.draw(st.sampled_from(MUTABLE))
    original = (root / name).read_bytes()
    (root / name).write_bytes(data.draw(mutated([original])))
    if name != "manifest.json" and data.draw(st.booleans()):
        import hashlib

        manifest = json.loads((root / "manifest.json").read_bytes())
        manifest["files"][name] = hashlib.sha256((root / name).read_bytes()).hexdigest()
        (root / "manifest.json").write_text(json.dumps(manifest))
    _load_only_bundle_errors(root)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True)
    | st.text(max_size=12) | st.sampled_from(["../x", "/etc/passwd", "thumbs/0000.jpg", "model.tflite"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:3]):
            yield from _paths(v, (*prefix, i))


@fuzz_settings
@given(data=st.data())
def test_bundle_manifest_values_replaced(tmp_path_factory, bundle_dir, data):
    """Replace or delete any value of manifest.json or products.json (kept valid JSON, and
    for products.json re-hashed): semantic nonsense must give a BundleError too."""
    import hashlib

    root = tmp_path_factory.mktemp("m", numbered=True) / "b"
    shutil.copytree(bundle_dir, root)
    name = data.draw(st.sampled_from(["manifest.json", "products.json"]))
    doc = json.loads((root / name).read_bytes())
    paths = [p for p in _paths(doc) if p]
    target = data.draw(st.sampled_from(paths))
    parent = doc
    for key in target[:-1]:
        parent = parent[key]
    if data.draw(st.booleans()) and isinstance(parent, dict):
        del parent[target[-1]]
    else:
        parent[target[-1]] = data.draw(JSON_VALUES)
    (root / name).write_text(json.dumps(doc))
    if name == "products.json":
        manifest = json.loads((root / "manifest.json").read_bytes())
        manifest["files"][name] = hashlib.sha256((root / name).read_bytes()).hexdigest()
        (root / "manifest.json").write_text(json.dumps(manifest))
    _load_only_bundle_errors(root)


def test_seed_corpus_loads():
    """The fuzz seeds themselves are valid (so the mutations start from real images)."""
    for name, data in zip(SEED_NAMES, SEEDS, strict=True):
        assert load_image(io.BytesIO(data)).mode == "RGB", name
