"""A manifest or array that passes every sha256 check but holds values the verifier cannot
use (a forger's or a hand editor's) is refused at load with a BundleFormatError naming the
field, instead of crashing or silently deciding wrong later."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest

from auditlens.cli import main
from auditlens.device_app.bundle import ReferenceBundle
from auditlens.device_app.verifier import Verifier
from auditlens.errors import BundleFormatError

from .corpus import product_image


def edit_manifest(root: Path, edit) -> None:
    manifest = json.loads((root / "manifest.json").read_bytes())
    edit(manifest)
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1))


def rewrite(root: Path, name: str, data: bytes) -> None:
    """Replace a bundle file and renew its sha256, as a careful forger would."""
    (root / name).write_bytes(data)
    edit_manifest(root, lambda m: m["files"].__setitem__(name, hashlib.sha256(data).hexdigest()))


def edit_products(root: Path, edit) -> None:
    products = json.loads((root / "products.json").read_bytes())
    edit(products)
    rewrite(root, "products.json", json.dumps(products).encode())


def _set(path: str, value):
    def edit(manifest):
        *parents, key = path.split(".")
        target = manifest
        for p in parents:
            target = target[p]
        target[key] = value
    return edit


def _delete(key: str):
    return lambda manifest: manifest.pop(key)


MANIFEST_EDITS = {
    "probe deleted": (_delete("probe"), r"probe"),
    "probe latent deleted": (lambda m: m["probe"].pop("latent"), r"probe"),
    "probe latent too short": (lambda m: m["probe"].__setitem__("latent", m["probe"]["latent"][:-1]),
                               r"probe\.latent has \d+ values, expected latent_dim"),
    "probe latent not numbers": (lambda m: m["probe"]["latent"].__setitem__(0, "x"), r"probe\.latent"),
    "probe latent NaN": (lambda m: m["probe"]["latent"].__setitem__(0, float("nan")), r"probe\.latent"),
    "decision deleted": (_delete("decision"), r"decision"),
    "threshold deleted": (lambda m: m["decision"].pop("threshold"), r"decision\.threshold"),
    "threshold NaN": (_set("decision.threshold", float("nan")), r"decision\.threshold"),
    "threshold inf": (_set("decision.threshold", float("inf")), r"decision\.threshold"),
    "threshold above the scores": (_set("decision.threshold", 50), r"decision\.threshold 50 is not a score"),
    "threshold below the scores": (_set("decision.threshold", -50), r"decision\.threshold"),
    "threshold a string": (_set("decision.threshold", "0.5"), r"decision\.threshold"),
    "threshold a bool": (_set("decision.threshold", True), r"decision\.threshold"),
    "target_far a string": (_set("decision.target_far", "1%"), r"decision\.target_far"),
    "far_curve of numbers": (_set("decision.far_curve", [1, 2, 3]), r"decision\.far_curve"),
    "far_curve of triples": (_set("decision.far_curve", [[0.1, 1.0, 0], [0.5, 0.0, 0]]), r"far_curve"),
    "far_curve a string": (_set("decision.far_curve", "steep"), r"far_curve"),
    "far_curve with NaN": (_set("decision.far_curve", [[0.1, 1.0], [float("nan"), 0.0]]), r"far_curve"),
    "far_curve scores falling": (_set("decision.far_curve", [[0.5, 1.0], [0.1, 0.0]]), r"far_curve"),
    "far_curve far rising": (_set("decision.far_curve", [[0.1, 0.0], [0.5, 1.0]]), r"far_curve"),
    "far_curve far above 1": (_set("decision.far_curve", [[0.1, 2.0], [0.5, 0.0]]), r"far_curve"),
}


@pytest.mark.parametrize("case", list(MANIFEST_EDITS))
def test_unusable_manifest_values_are_refused_at_load(bundle_copy, case):
    edit, message = MANIFEST_EDITS[case]
    edit_manifest(bundle_copy, edit)
    with pytest.raises(BundleFormatError, match=message):
        ReferenceBundle.load(bundle_copy)
    with pytest.raises(BundleFormatError, match=message):
        Verifier(bundle_copy)


def test_product_without_references_is_refused(bundle_copy):
    def edit(products):
        products[0]["references"] = []
    edit_products(bundle_copy, edit)
    with pytest.raises(BundleFormatError, match=r"product 'product-0' has no reference rows"):
        ReferenceBundle.load(bundle_copy)


@pytest.mark.parametrize("thumbnail", ["thumbs/9999.jpg", "", "model.tflite"])
def test_product_naming_a_missing_thumbnail_is_refused(bundle_copy, thumbnail):
    def edit(products):
        products[2]["thumbnail"] = thumbnail
    edit_products(bundle_copy, edit)
    with pytest.raises(BundleFormatError, match=r"product 'product-2' names thumbnail"):
        ReferenceBundle.load(bundle_copy)


def test_product_with_a_dhash_that_is_not_hex_is_refused(bundle_copy):
    def edit(products):
        products[1]["dhash"] = "not-a-hash"
    edit_products(bundle_copy, edit)
    with pytest.raises(BundleFormatError, match=r"product 'product-1' has a dhash"):
        ReferenceBundle.load(bundle_copy)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_reference_latents_are_refused(bundle_copy, value):
    references = np.load(bundle_copy / "references.npy")
    references[3, 5] = value
    _save_references(bundle_copy, references)
    with pytest.raises(BundleFormatError, match=r"references\.npy holds NaN or infinite values"):
        ReferenceBundle.load(bundle_copy)


def _save_references(root, references) -> None:
    buf = io.BytesIO()
    np.save(buf, references, allow_pickle=False)
    rewrite(root, "references.npy", buf.getvalue())


@pytest.mark.parametrize("change, message", [
    (lambda r: np.round(127 * r).astype(np.int8), r"holds int8, not floating-point latents"),
    (lambda r: (5 * r.astype(np.float32)).astype(np.float16), r"row \d+ has length 5(\.\d+)?, not 1"),
    (lambda r: np.where(np.arange(len(r))[:, None] == 4, 0.5 * r, r).astype(np.float16),
     r"row 4 has length 0\.5\d*, not 1"),
])
def test_reference_latents_that_are_not_unit_vectors_are_refused(bundle_copy, change, message):
    """Scaled or integer latents would push every score out of [-1, 1] and past any
    threshold (a photo of a banana scored 44.8 against carrots before this check)."""
    references = np.load(bundle_copy / "references.npy")
    assert references.dtype == np.float16
    _save_references(bundle_copy, change(references))
    with pytest.raises(BundleFormatError, match=message):
        ReferenceBundle.load(bundle_copy)


def test_valid_decisions_still_load_and_verify(bundle_copy):
    """No far_curve, an empty one, a one-point one, and the extreme thresholds are fine."""
    for far_curve in (None, [], [[0.5, 0.0]], [[-0.2, 1.0], [0.3, 0.5], [0.9, 0.0]]):
        for threshold in (-1, 1.0, 0.5):
            # without the products it was measured on, a curve is taken as this bundle's own
            edit_manifest(bundle_copy, lambda m, t=threshold, c=far_curve:
                          m["decision"].update(threshold=t, far_curve=c, products=None))
            b = ReferenceBundle.load(bundle_copy)
            assert b.threshold == threshold
    v = Verifier(b)
    verdict = v.verify(np.asarray(product_image(1)), "product-1")
    assert np.isfinite(verdict.score) and verdict.estimated_far is not None


def test_cli_reports_a_corrupt_manifest_in_one_line(bundle_copy, capsys, tmp_path):
    edit_manifest(bundle_copy, _delete("probe"))
    photo = tmp_path / "photo.png"
    product_image(1).save(photo)
    rc = main(["verify", str(photo), "--product", "product-1", "--bundle", str(bundle_copy)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1].startswith("auditlens: error:") and "probe" in err[-1]
