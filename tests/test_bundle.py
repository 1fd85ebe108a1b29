import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from auditlens.catalog import open_catalog
from auditlens.device_app.bundle import ReferenceBundle
from auditlens.device_app.verifier import Verifier
from auditlens.errors import (
    BundleError,
    BundleFormatError,
    CatalogError,
    ModelError,
    ModelMismatchError,
    UnknownProductError,
)
from auditlens.export.enroll import enroll

from .conftest import REPO, SAMPLE, needs_signing


@pytest.fixture
def bundle_dir(tmp_path, shipped_model):
    return enroll(open_catalog(SAMPLE / "catalog.csv"), tmp_path / "bundle", model=shipped_model,
                  extra_references=[], options=None)


def test_round_trip_keeps_products_latents_and_thumbnails(bundle_dir):
    b = ReferenceBundle.load(bundle_dir)
    assert [p.product_id for p in b.products] == open_catalog(SAMPLE / "catalog.csv").ids
    assert b.references.shape == (10, b.manifest["latent_dim"])
    assert b.references.dtype == np.float16  # held as stored: half the memory of float32
    np.testing.assert_allclose(np.linalg.norm(b.references.astype(np.float32), axis=1), 1.0, atol=2e-3)
    assert max(b.thumbnail("Banana").size) <= 160
    assert set(b.manifest["files"]) >= {"model.tflite", "references.npy", "products.json"}
    with pytest.raises(UnknownProductError, match="not in this bundle"):
        b.product("no-such-product")
    # an id typed with other case or stray spaces is refused, naming the bundle's id
    for typed in ("banana", " Banana", "Banana\n", "Bananas", "Bananna"):
        with pytest.raises(UnknownProductError, match="did you mean 'Banana'"):
            b.product(typed)
    with pytest.raises(UnknownProductError, match="enrol it or update the bundle"):
        b.product("Bandana-Print-Scarf")  # nothing close: no guess


def test_zip_bundle_loads_like_the_folder(tmp_path, shipped_model):
    out = enroll(open_catalog(SAMPLE / "catalog.csv"), tmp_path / "b.zip", model=shipped_model)
    assert zipfile.is_zipfile(out)
    folder = enroll(open_catalog(SAMPLE / "catalog.csv"), tmp_path / "b", model=shipped_model)
    np.testing.assert_array_equal(ReferenceBundle.load(out).references, ReferenceBundle.load(folder).references)


def test_reference_rows_are_checked_in_blocks_naming_the_bad_row(tmp_path):
    """Rows past the first block are checked too, and the error names the row in the file."""
    from auditlens.device_app.bundle import _check_unit_rows

    rng = np.random.default_rng(0)
    rows = rng.standard_normal((10, 16)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    _check_unit_rows(rows.astype(np.float16), tmp_path, block=4)
    long = rows.copy()
    long[9] *= 1.5
    with pytest.raises(BundleFormatError, match="row 9 has length 1.5"):
        _check_unit_rows(long.astype(np.float16), tmp_path, block=4)
    broken = rows.astype(np.float16)
    broken[6, 3] = np.inf
    with pytest.raises(BundleFormatError, match="NaN or infinite"):
        _check_unit_rows(broken, tmp_path, block=4)


def test_edited_manifest_is_refused(bundle_dir):
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    manifest["decision"]["threshold"] = -1.0  # makes every photo a match
    manifest["format_version"] = 0
    (bundle_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleFormatError, match="format version 0"):
        ReferenceBundle.load(bundle_dir)


def test_latents_of_another_model_are_refused(tmp_path, bundle_dir, shipped_model):
    """Swap in another model and rewrite every hash consistently: the probe latent and the
    model id recorded with the references still expose the swap."""
    other = bytearray(shipped_model.read_bytes())
    # a different but valid model: same graph, one weight buffer byte changed
    other[len(other) // 3] ^= 0x10
    swapped = tmp_path / "swapped"
    shutil.copytree(bundle_dir, swapped)
    (swapped / "model.tflite").write_bytes(bytes(other))
    manifest = json.loads((swapped / "manifest.json").read_text())
    from auditlens.device_app.bundle import sha256_bytes
    from auditlens.device_app.interpreter import model_id_of

    manifest["files"]["model.tflite"] = sha256_bytes(bytes(other))
    manifest["model"]["id"] = model_id_of(bytes(other))
    (swapped / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelMismatchError, match="computed with model"):
        ReferenceBundle.load(swapped)
    # and a separately installed model that is not the bundle's is refused too
    with pytest.raises(ModelMismatchError, match="does not belong"):
        Verifier(bundle_dir, model=bytes(other))


def test_a_zip_of_the_bundle_folder_says_how_to_zip_it(tmp_path, bundle_dir):
    """`zip -r b.zip bundle/` nests every file under bundle/: say so, not just 'no manifest'."""
    nested = tmp_path / "nested.zip"
    with zipfile.ZipFile(nested, "w") as z:
        for f in sorted(bundle_dir.rglob("*")):
            if f.is_file():
                z.write(f, f.relative_to(bundle_dir.parent).as_posix())
    with pytest.raises(BundleFormatError, match=r"inside a folder \(bundle/\); zip the bundle's files themselves"):
        ReferenceBundle.load(nested)
    flat = tmp_path / "flat.zip"
    with zipfile.ZipFile(flat, "w") as z:
        for f in sorted(bundle_dir.rglob("*")):
            if f.is_file():
                z.write(f, f.relative_to(bundle_dir).as_posix())
    np.testing.assert_array_equal(ReferenceBundle.load(flat).references, ReferenceBundle.load(bundle_dir).references)


def test_a_damaged_or_unusual_zip_is_a_bundle_error(tmp_path, bundle_dir):
    """zipfile raises NotImplementedError for a central directory that asks for an unknown
    zip version, and for a compression method it lacks (Deflate64): both are bundle
    errors with a reason, not a crash."""
    good = tmp_path / "good.zip"
    with zipfile.ZipFile(good, "w") as z:
        for f in sorted(bundle_dir.rglob("*")):
            if f.is_file():
                z.write(f, f.relative_to(bundle_dir).as_posix())
    data = good.read_bytes()
    central = data.find(b"PK\x01\x02")
    version = bytearray(data)
    version[central + 6] = 0xFF  # "version needed to extract" of the first entry
    (tmp_path / "version.zip").write_bytes(bytes(version))
    with pytest.raises(BundleFormatError, match="not a readable zip bundle: zip file version"):
        ReferenceBundle.load(tmp_path / "version.zip")
    method = bytearray(data)
    at = central
    while at != -1:  # every entry's compression method: 9, Deflate64
        method[at + 10:at + 12] = (9).to_bytes(2, "little")
        at = data.find(b"PK\x01\x02", at + 4)
    (tmp_path / "deflate64.zip").write_bytes(bytes(method))
    with pytest.raises(BundleFormatError, match="cannot unpack manifest.json.*compression method"):
        ReferenceBundle.load(tmp_path / "deflate64.zip")


def test_a_model_file_that_cannot_be_read_is_a_model_error(tmp_path, bundle_dir):
    from auditlens.errors import ModelError

    for missing in (tmp_path / "none.tflite", tmp_path):
        with pytest.raises(ModelError, match="cannot read the model"):
            Verifier(bundle_dir, model=missing)


def test_missing_bundle_and_non_bundle_zip(tmp_path):
    with pytest.raises(BundleFormatError, match="no bundle here"):
        ReferenceBundle.load(tmp_path / "nothing")
    junk = tmp_path / "junk.zip"
    junk.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(BundleFormatError, match="zip"):
        ReferenceBundle.load(junk)


def test_failed_enrolment_leaves_no_half_bundle(tmp_path, shipped_model, generated_catalog):
    out = tmp_path / "out"
    enroll(open_catalog(generated_catalog), out, model=shipped_model)
    before = (out / "manifest.json").read_bytes()
    (generated_catalog / "product-2.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    from auditlens.errors import CatalogError

    with pytest.raises(CatalogError, match="product-2"):
        enroll(open_catalog(generated_catalog), out, model=shipped_model)
    assert (out / "manifest.json").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


# -- writing over an existing path --------------------------------------------------
def _tree(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() if p.is_file() else None
            for p in sorted(root.rglob("*"))}


def test_enrol_refuses_a_folder_that_is_not_a_bundle_before_any_work(tmp_path, generated_catalog):
    out = tmp_path / "outdir"
    (out / "important").mkdir(parents=True)
    (out / "report.docx").write_text("precious")
    before = _tree(out)
    # the model does not exist: the check must come first, before it is read
    with pytest.raises(BundleError, match="outdir exists and is not an auditlens bundle.*another --out"):
        enroll(open_catalog(generated_catalog), out, model=tmp_path / "no-such-model.tflite")
    assert _tree(out) == before


def test_enrol_into_the_catalogue_folder_deletes_nothing(tmp_path, shipped_model, generated_catalog,
                                                         monkeypatch):
    before = _tree(generated_catalog)
    with pytest.raises(BundleError, match="not an auditlens bundle"):
        enroll(open_catalog(generated_catalog), generated_catalog, model=shipped_model)
    # the write itself refuses too, for a caller that skipped the early check
    monkeypatch.setattr("auditlens.export.enroll.check_replaceable", lambda out: None)
    with pytest.raises(BundleError, match="not an auditlens bundle"):
        enroll(open_catalog(generated_catalog), generated_catalog, model=shipped_model)
    assert _tree(generated_catalog) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".{generated_catalog.name}.")]


def test_enrol_refuses_a_bundle_folder_holding_other_files(tmp_path, shipped_model, generated_catalog):
    out = enroll(open_catalog(generated_catalog), tmp_path / "b", model=shipped_model)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(BundleError, match="holds notes.txt"):
        enroll(open_catalog(generated_catalog), out, model=shipped_model)
    assert (out / "notes.txt").read_text() == "mine"
    ReferenceBundle.load(out)  # untouched


@pytest.mark.parametrize("content", [
    b"precious",  # not a zip
    None,  # a zip, but not a bundle
    json.dumps({"name": "my web app"}).encode(),  # a zip whose manifest.json is another program's
])
def test_enrol_refuses_a_file_that_is_not_a_zip_bundle(tmp_path, generated_catalog, content):
    out = tmp_path / "photos.zip"
    if content == b"precious":
        out.write_bytes(content)
    else:
        with zipfile.ZipFile(out, "w") as zf:
            zf.writestr("manifest.json" if content else "holiday.jpg", content or b"jpeg")
    before = out.read_bytes()
    with pytest.raises(BundleError, match="photos.zip exists and is not an auditlens bundle"):
        enroll(open_catalog(generated_catalog), out, model=tmp_path / "no-such-model.tflite")
    assert out.read_bytes() == before


def test_enrol_refuses_a_folder_with_another_programs_manifest(tmp_path, generated_catalog):
    out = tmp_path / "site"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"name": "my web app", "files": {}}))
    with pytest.raises(BundleError, match="not an auditlens bundle manifest"):
        enroll(open_catalog(generated_catalog), out, model=tmp_path / "no-such-model.tflite")
    assert (out / "manifest.json").is_file()


def test_an_existing_bundle_or_empty_folder_is_replaced(tmp_path, shipped_model, generated_catalog):
    sample_ids = open_catalog(SAMPLE / "catalog.csv").ids
    for name in ("b", "b.zip"):
        out = enroll(open_catalog(generated_catalog), tmp_path / name, model=shipped_model)
        enroll(open_catalog(SAMPLE / "catalog.csv"), out, model=shipped_model)
        assert [p.product_id for p in ReferenceBundle.load(out).products] == sample_ids
    # a bundle folder zipped by hand (with a thumbs/ directory entry) is a bundle too
    zipped = Path(shutil.make_archive(str(tmp_path / "zipped"), "zip", root_dir=tmp_path / "b"))
    assert "thumbs/" in zipfile.ZipFile(zipped).namelist()
    enroll(open_catalog(generated_catalog), zipped, model=shipped_model)
    assert len(ReferenceBundle.load(zipped).products) == 6
    empty = tmp_path / "empty"
    empty.mkdir()
    enroll(open_catalog(generated_catalog), empty, model=shipped_model)
    assert len(ReferenceBundle.load(empty).products) == 6
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_enrol_refuses_an_unreadable_model_card_and_ignores_another_models_decision(tmp_path, shipped_model):
    """A broken card would silently change the photo views and the threshold; a card whose
    decision was calibrated for another model must not lend that threshold to this one."""
    model = tmp_path / "encoder.tflite"
    shutil.copy(shipped_model, model)
    card = json.loads((shipped_model.with_suffix(".json")).read_text())
    catalog = open_catalog(SAMPLE / "catalog.csv")
    model.with_suffix(".json").write_text(json.dumps(card)[:-20])
    with pytest.raises(ModelError, match="encoder.json: the model card cannot be read"):
        enroll(catalog, tmp_path / "broken", model=model)
    assert not (tmp_path / "broken").exists()

    card["decision"]["model_id"] = "0123456789abcdef"
    model.with_suffix(".json").write_text(json.dumps(card))
    warnings = []
    b = ReferenceBundle.load(enroll(catalog, tmp_path / "other", model=model, warn=warnings.append))
    assert b.decision["target_far"] is None and b.threshold != card["decision"]["threshold"]
    assert "calibrated for model 0123456789abcdef" in warnings[0]
    assert b.spec.photo_zooms == tuple(card["preprocess"]["photo_zooms"])  # the views still apply


@pytest.mark.parametrize("edit, why", [
    (lambda c: c["preprocess"].update(input_size="x"), "input_size .x. is not a whole number"),
    (lambda c: c["preprocess"].update(photo_mirror="false"), "photo_mirror .false. is not true or false"),
    (lambda c: c.update(preprocess={}), "input_size"),
    (lambda c: (c["decision"].pop("cells"), c["decision"].update(threshold=2)),
     "its decision.threshold 2 is not a cosine"),
    (lambda c: c["decision"].update(threshold=50), r"its decision.threshold 50 is not a score within \[-11"),
    (lambda c: c["decision"].update(far_curve=[[0.1, 0.5], [0.2, 0.9]]), "falling false-accept rates"),
    (lambda c: c["preprocess"].update(input_size=96), "gives an input of 96 px, but the model takes 128 px"),
])
def test_enrol_refuses_a_model_card_with_unusable_values(tmp_path, shipped_model, edit, why):
    """A card that reads as JSON but holds values no bundle may carry is refused before any
    work, and an installed bundle at --out is left as it was."""
    model = tmp_path / "encoder.tflite"
    shutil.copy(shipped_model, model)
    card = json.loads((shipped_model.with_suffix(".json")).read_text())
    catalog = open_catalog(SAMPLE / "catalog.csv")
    installed = enroll(catalog, tmp_path / "installed", model=model)
    before = (installed / "manifest.json").read_bytes()
    edit(card)
    model.with_suffix(".json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match=f"model card beside .*encoder.tflite is not usable .*{why}"):
        enroll(catalog, installed, model=model)
    assert (installed / "manifest.json").read_bytes() == before


def test_enrol_reports_every_unusable_reference_photo(tmp_path, shipped_model):
    from auditlens.catalog import LabelledPhoto

    (tmp_path / "cut.jpg").write_bytes((SAMPLE / "photos" / "Banana_001.jpg").read_bytes()[:300])
    refs = [LabelledPhoto(str(SAMPLE / "photos" / "Banana_001.jpg"), "Banana"),
            LabelledPhoto(str(tmp_path / "cut.jpg"), "Banana"),
            LabelledPhoto(str(tmp_path / "missing.jpg"), "Carrots")]
    with pytest.raises(CatalogError, match="2 reference photo") as err:
        enroll(open_catalog(SAMPLE / "catalog.csv"), tmp_path / "b", model=shipped_model, extra_references=refs)
    assert "cut.jpg" in str(err.value) and "missing.jpg" in str(err.value)
    assert not (tmp_path / "b").exists()


@needs_signing
def test_bundles_are_written_where_os_has_no_sync_or_fchmod(tmp_path, monkeypatch, shipped_model,
                                                           generated_catalog):
    """Windows Python has neither os.sync nor os.fchmod: the staged files are fsynced one by
    one and the key files written without a mode."""
    import os

    from auditlens.device_app.signing import generate_keypair

    for name in ("sync", "fchmod"):
        if hasattr(os, name):
            monkeypatch.delattr(os, name)
    synced = set()  # inodes: a rename into place keeps them
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.add(os.fstat(fd).st_ino) or real_fsync(fd))
    private, public = generate_keypair(tmp_path / "keys")
    out = enroll(open_catalog(generated_catalog), tmp_path / "b", model=shipped_model,
                 signing_key=private.read_bytes())
    assert len(ReferenceBundle.load(out, public_key=public).products) == 6
    written = {f.stat().st_ino for f in [*out.rglob("*"), private, public] if f.is_file()}
    assert len(written) > 10 and written <= synced  # every bundle file, and the two keys


def test_cli_enrol_and_calibrate_refuse_a_non_bundle_out(tmp_path, bundle_dir, capsys):
    from auditlens.cli import main

    out = tmp_path / "outdir"
    (out / "important").mkdir(parents=True)
    (out / "report.docx").write_text("precious")
    before = _tree(out)
    rc = main(["enroll", str(SAMPLE / "catalog.csv"), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("auditlens: error:") and "not an auditlens bundle" in err[-1]
    rc = main(["calibrate", "--bundle", str(bundle_dir), "--photos", str(SAMPLE / "photos.csv"),
               "--target-far", "0.1", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("auditlens: error:") and "not an auditlens bundle" in err[-1]
    assert _tree(out) == before


def test_enrolling_over_a_signed_bundle_keeps_a_signature_or_is_told_to_drop_it(tmp_path, shipped_model):
    """Re-enrolling into the path of a signed bundle without a key used to write it back
    unsigned, silently; devices that require signatures then refuse it."""
    pytest.importorskip("cryptography")
    from auditlens.cli import main
    from auditlens.device_app.signing import generate_keypair
    from auditlens.errors import BundleSignatureError

    private, public = generate_keypair(tmp_path / "keys")
    catalog = open_catalog(SAMPLE / "catalog.csv")
    for out in (tmp_path / "signed", tmp_path / "signed.zip"):
        enroll(catalog, out, model=shipped_model, signing_key=private.read_bytes())
        before = out.stat().st_mtime_ns
        with pytest.raises(BundleSignatureError, match="--drop-signature"):
            enroll(catalog, out, model=shipped_model)
        assert out.stat().st_mtime_ns == before
        assert ReferenceBundle.load(out, public_key=public.read_bytes()).signed_by
        enroll(catalog, out, model=shipped_model, signing_key=private.read_bytes())  # re-signed
        assert ReferenceBundle.load(out, public_key=public.read_bytes()).signed_by
        assert main(["enroll", str(SAMPLE / "catalog.csv"), "--out", str(out), "--model", str(shipped_model),
                     "--drop-signature", "--no-progress"]) == 0
        assert not ReferenceBundle.load(out).has_signature


def test_enrolment_warns_of_products_that_share_one_original(tmp_path, shipped_model):
    import shutil

    folder = tmp_path / "originals"
    shutil.copytree(SAMPLE / "originals", folder)
    for pid in ("SKU-100", "SKU-101"):  # a placeholder picture filed under two new ids
        shutil.copy(folder / "Banana.jpg", folder / f"{pid}.jpg")
    notes: list[str] = []
    enroll(open_catalog(folder), tmp_path / "b", model=shipped_model, warn=notes.append)
    shared = [n for n in notes if "same original image" in n]
    assert shared == ["products Banana, SKU-100, SKU-101 (3) have the same original image, so a photo "
                      "of any of them matches them all: give each its own image"]
    notes.clear()
    enroll(open_catalog(SAMPLE / "catalog.csv"), tmp_path / "c", model=shipped_model, warn=notes.append)
    assert not [n for n in notes if "same original image" in n]


def test_a_model_card_copied_away_from_its_model_is_refused(tmp_path, shipped_model):
    """export writes the model's id into its card: a card beside another model (a model
    retrained and converted by hand, the old card left in place) or named to calibrate
    --model-card for another model is refused instead of lending its views and threshold."""
    from auditlens.cli import main

    other = bytearray(shipped_model.read_bytes())
    other[len(other) // 3] ^= 0x10  # another model
    model = tmp_path / "encoder.tflite"
    model.write_bytes(bytes(other))
    shutil.copy(shipped_model.with_suffix(".json"), model.with_suffix(".json"))
    from auditlens.device_app.interpreter import model_id_of

    with pytest.raises(ModelError, match=f"is for model {model_id_of(shipped_model.read_bytes())}, "
                                         f"not this model {model_id_of(bytes(other))}"):
        enroll(open_catalog(SAMPLE / "catalog.csv"), tmp_path / "b", model=model)
    assert not (tmp_path / "b").exists()

    bundle = enroll(open_catalog(SAMPLE / "catalog.csv"), tmp_path / "own", model=shipped_model)
    elsewhere = tmp_path / "cards" / "encoder.json"
    elsewhere.parent.mkdir()
    card = json.loads(shipped_model.with_suffix(".json").read_text())
    elsewhere.write_text(json.dumps({**card, "model_id": "0123456789abcdef"}))
    assert main(["calibrate", "-b", str(bundle), "--photos", str(SAMPLE / "photos.csv"), "--target-far", "0.1",
                 "--model-card", str(elsewhere), "--no-progress"]) == 2
    assert json.loads(elsewhere.read_text())["model_id"] == "0123456789abcdef"


def _rehashed(bundle: Path, name: str, data: bytes) -> None:
    """Replace one file of an unsigned bundle and its sha256 in the manifest, as a hand
    edit that knows the format would."""
    from auditlens.device_app.bundle import sha256_bytes

    (bundle / name).write_bytes(data)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"][name] = sha256_bytes(data)
    (bundle / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("edit, why", [
    (lambda p: p[0].update(references="10"), "references '10' is not a list of row numbers"),
    (lambda p: p[0].update(references=[0.5]), "is not a list of row numbers"),
    (lambda p: p[0].update(references=[True]), "is not a list of row numbers"),
    (lambda p: p[0].update(product_id=None), "invalid product id None"),
    (lambda p: p[0].update(product_id="../x"), "invalid product id '../x'"),
    (lambda p: p[0].update(name=None), "name is None, not text"),
    (lambda p: p.__setitem__(0, "Banana"), "a product entry is str, not an object"),
    (lambda p: p[0].update(box_dhashes="1e06"), "box_dhashes '1e06' is not a list of texts"),
    (lambda p: p[0].update(box_dhashes=["1e06", "xyz"]), "has a dhash 'xyz' that is not hexadecimal"),
])
def test_products_of_the_wrong_type_are_refused_not_converted(tmp_path, bundle_dir, edit, why):
    """products.json re-hashed into the manifest: a row written as a string, a null id or
    name used to be read as rows "1" and "0", the id "None", ..."""
    products = json.loads((bundle_dir / "products.json").read_text())
    edit(products)
    _rehashed(bundle_dir, "products.json", json.dumps(products).encode())
    with pytest.raises(BundleFormatError, match=why):
        ReferenceBundle.load(bundle_dir)


@pytest.mark.parametrize("edit, why", [
    (lambda m: m["preprocess"].update(photo_mirror="false"), "photo_mirror 'false' is not true or false"),
    (lambda m: m["preprocess"].update(photo_zooms=[0.7] * 5000), "5000 zooms, more than 8"),
    (lambda m: m["preprocess"].update(photo_zooms="0.7"), "photo_zooms '0.7' is not a list of numbers"),
    (lambda m: m["probe"]["latent"].__setitem__(0, 1e39), "not finite float32 numbers"),
    (lambda m: m["probe"].update(latent=[3e38] * len(m["probe"]["latent"])), "not the unit latent"),
])
def test_manifest_values_of_the_wrong_type_are_refused(bundle_dir, edit, why):
    """An unsigned manifest edited by hand: mirroring switched on by the string "false",
    5,000 photo views (5,000 encoder runs a verification), a probe latent that overflows
    float32 (its cosine would be NaN, which no threshold test fails)."""
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    edit(manifest)
    (bundle_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleFormatError, match=why):
        ReferenceBundle.load(bundle_dir)


def test_a_fifo_or_deep_json_in_a_bundle_is_refused_without_hanging(tmp_path, bundle_dir):
    import os

    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this system")
    fifo = tmp_path / "fifo"
    shutil.copytree(bundle_dir, fifo)
    thumb = sorted((fifo / "thumbs").iterdir())[0]
    thumb.unlink()
    os.mkfifo(thumb)  # reading it would block until a writer came: for ever
    with pytest.raises(BundleFormatError, match=f"{thumb.name} is not a regular file"):
        ReferenceBundle.load(fifo)
    (fifo / "manifest.json").unlink()
    os.mkfifo(fifo / "manifest.json")
    with pytest.raises(BundleFormatError, match="manifest.json is not a regular file"):
        ReferenceBundle.load(fifo)

    deep = tmp_path / "deep"
    shutil.copytree(bundle_dir, deep)
    _rehashed(deep, "products.json", b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(BundleFormatError, match="products.json nests too deep"):
        ReferenceBundle.load(deep)
    (deep / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(BundleError, match="manifest.json nests too deep"):
        ReferenceBundle.load(deep)


def test_a_model_card_or_run_given_as_a_bundle_is_named_for_what_it_is(tmp_path):
    """The files an engineer has beside a bundle (the model, its card, a training run) are
    refused as what they are, with the command that makes a bundle."""
    from auditlens.device_app.bundle import ReferenceBundle
    from auditlens.errors import BundleFormatError

    run = tmp_path / "run"
    run.mkdir()
    (run / "report.json").write_text("{}")
    for path, what in ((REPO / "models" / "encoder.tflite", "is a TFLite model"),
                       (REPO / "models" / "encoder.json", "is a JSON file (a model card or a report?)"),
                       (run, "is a training run or an evaluation report"),
                       (REPO / "models" / "sample_bundle" / "manifest.json",
                        "is a bundle's manifest: give the bundle's folder, the one holding it")):
        with pytest.raises(BundleFormatError, match=r"auditlens enroll CATALOG --model") as caught:
            ReferenceBundle.load(path)
        assert f"{path} {what}, not a reference bundle" in str(caught.value)
