"""Tampered, hostile and mismatched reference bundles are refused with a specific error;
signed bundles are accepted only with the publisher's key."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest

from auditlens.cli import main
from auditlens.device_app.bundle import ReferenceBundle
from auditlens.errors import (
    BundleError,
    BundleFormatError,
    BundleIntegrityError,
    BundleSignatureError,
    ModelMismatchError,
)

from ..conftest import needs_signing
from .corpus import time_limit


# -- helpers ------------------------------------------------------------------------------
def flip(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


def rehash(root: Path, *names: str, **manifest_updates) -> None:
    """Make the manifest consistent with the files again, as a careful forger would."""
    manifest = json.loads((root / "manifest.json").read_bytes())
    for name in names:
        manifest["files"][name] = hashlib.sha256((root / name).read_bytes()).hexdigest()
    for key, value in manifest_updates.items():
        manifest[key] = value
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1))


def zip_members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {i.filename: zf.read(i) for i in zf.infolist()}


def write_zip(path: Path, members: dict[str, bytes], compression=zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def other_model(content: bytes, seed: int = 1) -> bytes:
    """The same architecture with different weights: each large constant weight tensor's
    bytes are found in the flatbuffer and replaced by a permutation of themselves."""
    from ai_edge_litert.interpreter import Interpreter

    # no allocate_tensors(): only constant tensors (weights, stored in the file) have data
    # then; after it, arena tensors would show stale memory that may copy parts of the file
    interpreter = Interpreter(model_content=content)
    rng = np.random.default_rng(seed)
    data = bytearray(content)
    changed = 0
    for detail in interpreter.get_tensor_details():
        try:
            tensor = interpreter.get_tensor(detail["index"])
        except ValueError:
            continue
        raw = tensor.tobytes()
        if tensor.size < 256 or content.count(raw) != 1:
            continue
        flat = tensor.reshape(-1).copy()
        rng.shuffle(flat)
        start = content.index(raw)
        data[start:start + len(raw)] = flat.tobytes()
        changed += 1
    assert changed, "no weight tensor found to change"
    return bytes(data)


def load(path, **kwargs):
    with time_limit(30, "ReferenceBundle.load"):
        return ReferenceBundle.load(path, **kwargs)


# -- integrity ------------------------------------------------------------------------------
def test_intact_bundle_loads(bundle_dir):
    b = load(bundle_dir)
    assert len(b.products) == 6 and b.signed_by is None


@pytest.mark.parametrize("name", ["model.tflite", "references.npy", "products.json", "thumbs/0003.jpg"])
def test_flipped_byte_in_file(bundle_copy, name):
    flip(bundle_copy / name)
    with pytest.raises(BundleIntegrityError, match=name.replace(".", r"\.") + ".*sha256"):
        load(bundle_copy)


def test_flipped_byte_in_manifest_digest(bundle_copy):
    raw = (bundle_copy / "manifest.json").read_bytes()
    digest = json.loads(raw)["files"]["model.tflite"].encode()
    flip(bundle_copy / "manifest.json", raw.index(digest) + 5)
    with pytest.raises(BundleIntegrityError, match="model.tflite"):
        load(bundle_copy)


def test_flipped_byte_in_manifest_structure(bundle_copy):
    raw = (bundle_copy / "manifest.json").read_bytes()
    flip(bundle_copy / "manifest.json", raw.index(b"{"))
    with pytest.raises(BundleIntegrityError, match="not valid JSON"):
        load(bundle_copy)


def _manifest_flip_sweep(root: Path, **kwargs) -> tuple[int, int, list[int]]:
    """Flip every 3rd byte of manifest.json, one at a time: (tried, refused, accepted offsets)."""
    original = (root / "manifest.json").read_bytes()
    tried = refused = 0
    accepted = []
    for offset in range(0, len(original), 3):
        data = bytearray(original)
        data[offset] ^= 0x01
        (root / "manifest.json").write_bytes(bytes(data))
        tried += 1
        try:
            ReferenceBundle.load(root, **kwargs)
            accepted.append(offset)
        except BundleError:
            refused += 1
    (root / "manifest.json").write_bytes(original)
    return tried, refused, accepted


def test_manifest_flip_sweep_unsigned_vs_signed(tmp_path, bundle_dir, signed_bundle, keypair):
    """Unsigned, a flip that keeps the JSON valid and changes an unchecked value (the date,
    the threshold, the probe) goes unnoticed; signed, every single flip is refused."""
    unsigned = tmp_path / "u"
    shutil.copytree(bundle_dir, unsigned)
    tried, refused, accepted = _manifest_flip_sweep(unsigned)
    assert refused > tried // 2
    raw = (unsigned / "manifest.json").read_bytes()
    start = raw.index(b'"files"')
    end = raw.index(b"}", start)  # the file list: names and sha256s, every byte checked
    assert accepted and not [offset for offset in accepted if start <= offset <= end]

    signed = tmp_path / "s"
    signed.mkdir()
    for name, data in zip_members(signed_bundle).items():
        (signed / name).parent.mkdir(parents=True, exist_ok=True)
        (signed / name).write_bytes(data)
    tried_s, refused_s, accepted_s = _manifest_flip_sweep(signed, public_key=keypair[1].read_bytes())
    assert accepted_s == [] and refused_s == tried_s
    print(f"\nmanifest flips: unsigned {tried} tried, {refused} refused, {len(accepted)} accepted; "
          f"signed {tried_s} tried, {refused_s} refused")


# -- unsafe paths -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "thumbs/../../x.jpg", "thumbs\\..\\x.jpg",
                                  "manifest.json", "thumbs/0000.jpg/.."])
def test_manifest_names_path_outside_bundle(bundle_copy, name):
    outside = bundle_copy.parent / "x"
    outside.write_bytes(b"secret")
    manifest = json.loads((bundle_copy / "manifest.json").read_bytes())
    manifest["files"][name] = hashlib.sha256(b"secret").hexdigest()
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleFormatError, match="unexpected file"):
        load(bundle_copy)


def test_symlinked_file_in_folder(bundle_copy, tmp_path):
    """A symlink is refused even when its target has the right content and hash."""
    target = tmp_path / "elsewhere.jpg"
    shutil.copyfile(bundle_copy / "thumbs" / "0000.jpg", target)
    (bundle_copy / "thumbs" / "0000.jpg").unlink()
    (bundle_copy / "thumbs" / "0000.jpg").symlink_to(target)
    with pytest.raises(BundleFormatError, match="symlink"):
        load(bundle_copy)


def test_symlinked_model(bundle_copy, tmp_path):
    target = tmp_path / "model.tflite"
    shutil.copyfile(bundle_copy / "model.tflite", target)
    (bundle_copy / "model.tflite").unlink()
    (bundle_copy / "model.tflite").symlink_to(target)
    with pytest.raises(BundleFormatError, match="symlink"):
        load(bundle_copy)


def test_symlinked_directory_in_folder(bundle_copy, tmp_path):
    outside = tmp_path / "outside-thumbs"
    shutil.copytree(bundle_copy / "thumbs", outside)
    shutil.rmtree(bundle_copy / "thumbs")
    (bundle_copy / "thumbs").symlink_to(outside)
    with pytest.raises(BundleFormatError, match="outside the bundle"):
        load(bundle_copy)


def test_bundle_folder_reached_through_a_symlink_is_fine(bundle_dir, tmp_path):
    link = tmp_path / "current"
    link.symlink_to(bundle_dir)
    assert len(load(link).products) == 6


def _zip_of(folder: Path, path: Path, extra: dict[str, bytes] | None = None) -> Path:
    members = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    members.update(extra or {})
    return write_zip(path, members)


def test_zip_bundle_loads(bundle_dir, tmp_path):
    assert len(load(_zip_of(bundle_dir, tmp_path / "b.zip")).products) == 6


@pytest.mark.parametrize("member", ["../evil.txt", "/abs/evil.txt", "thumbs/../../evil.txt", "thumbs\\evil.txt"])
def test_zip_member_outside_bundle(bundle_dir, tmp_path, member):
    path = _zip_of(bundle_dir, tmp_path / "b.zip", {member: b"x"})
    with pytest.raises(BundleFormatError, match="outside the bundle"):
        load(path)
    assert not (tmp_path / "evil.txt").exists()


def test_zip_symlink_member(bundle_dir, tmp_path):
    path = _zip_of(bundle_dir, tmp_path / "b.zip")
    with zipfile.ZipFile(path, "a") as zf:
        info = zipfile.ZipInfo("thumbs/link.jpg")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(BundleFormatError, match="symlink"):
        load(path)


# -- zip bombs --------------------------------------------------------------------------------
@contextlib.contextmanager
def _peak_mib():
    """The most memory Python allocated inside the block, in MiB (tracemalloc: unlike the
    process's ru_maxrss, a peak reached before the block, while the bomb was built, does
    not hide one inside it)."""
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    peak = []
    try:
        yield lambda: peak[0]
    finally:
        peak.append((tracemalloc.get_traced_memory()[1] - base) / 2**20)
        if started:
            tracemalloc.stop()


def test_zip_bomb_declared_size(bundle_dir, tmp_path):
    """A member whose central-directory entry declares ~4 GB is refused from the directory."""
    path = _zip_of(bundle_dir, tmp_path / "b.zip", {"padding.bin": b"\0" * 100})
    data = bytearray(path.read_bytes())
    cd = data.rindex(b"PK\x01\x02" + data[data.rindex(b"PK\x01\x02") + 4:data.rindex(b"PK\x01\x02") + 6])
    # uncompressed size lives at offset 24 of a central directory header
    data[cd + 24:cd + 28] = struct.pack("<I", 0xFFFF0000)
    path.write_bytes(bytes(data))
    with pytest.raises(BundleFormatError, match="unpacks to|zip bomb|not a readable zip"):
        load(path)


def test_zip_bomb_ratio(bundle_dir, tmp_path):
    """model.tflite replaced by 64 MiB of zeros deflated to ~64 KiB (hash rewritten): refused
    from the directory, before anything is inflated."""
    members = {p.relative_to(bundle_dir).as_posix(): p.read_bytes() for p in sorted(bundle_dir.rglob("*")) if p.is_file()}
    bomb = bytes(64 * 2**20)
    members["model.tflite"] = bomb
    manifest = json.loads(members["manifest.json"])
    manifest["files"]["model.tflite"] = hashlib.sha256(bomb).hexdigest()
    members["manifest.json"] = json.dumps(manifest).encode()
    path = write_zip(tmp_path / "bomb.zip", members, zipfile.ZIP_DEFLATED)
    del bomb, members
    assert path.stat().st_size < 2**20
    with _peak_mib() as peak, pytest.raises(BundleFormatError, match="zip bomb"):
        load(path)
    assert peak() < 32


def test_many_small_bombs_are_refused_by_the_whole_zips_ratio(bundle_dir, tmp_path):
    """300 thumbnails of 1 MiB of zeros each (at the per-member limit, listed in the
    manifest with their hashes): 300 MiB from a 1 MB zip, refused from the directory."""
    members = {p.relative_to(bundle_dir).as_posix(): p.read_bytes() for p in sorted(bundle_dir.rglob("*")) if p.is_file()}
    manifest = json.loads(members["manifest.json"])
    zeros = bytes(2**20)
    for i in range(300):
        members[f"thumbs/{9000 + i}.jpg"] = zeros
        manifest["files"][f"thumbs/{9000 + i}.jpg"] = hashlib.sha256(zeros).hexdigest()
    members["manifest.json"] = json.dumps(manifest).encode()
    path = write_zip(tmp_path / "bombs.zip", members, zipfile.ZIP_DEFLATED)
    del members
    assert path.stat().st_size < 2 * 2**20
    with _peak_mib() as peak, pytest.raises(BundleFormatError, match=r"bytes unpack to 31\d,\d{3},\d{3} .*zip bomb"):
        load(path)
    assert peak() < 32


def test_a_thumbnail_no_product_shows_is_refused(bundle_dir, tmp_path):
    """Every file a manifest lists is read: one that nothing uses is refused."""
    copy = shutil.copytree(bundle_dir, tmp_path / "copy")
    shutil.copy(copy / "thumbs" / "0000.jpg", copy / "thumbs" / "9999.jpg")
    rehash(copy, "thumbs/9999.jpg")
    with pytest.raises(BundleFormatError, match=r"lists 1 thumbnails no product shows \(thumbs/9999.jpg"):
        load(copy)


def test_a_zip_naming_a_member_twice_is_refused(bundle_dir, tmp_path):
    """Two manifest.json entries: zipfile reads the last, other tools the first."""
    path = _zip_of(bundle_dir, tmp_path / "b.zip")
    manifest = json.loads(zip_members(path)["manifest.json"])
    manifest["decision"]["threshold"] = -1.0
    with zipfile.ZipFile(path, "a") as zf, pytest.warns(UserWarning, match="Duplicate name"):
        zf.writestr("manifest.json", json.dumps(manifest))
    with pytest.raises(BundleFormatError, match="member 'manifest.json' appears twice"):
        load(path)


def test_not_a_zip(tmp_path):
    path = tmp_path / "bundle.zip"
    path.write_bytes(b"PK\x03\x04 this is not a zip")
    with pytest.raises(BundleFormatError, match="not a readable zip"):
        load(path)


def test_corrupt_zip_member(bundle_dir, tmp_path):
    """Deflated member with a flipped byte: CRC/inflate errors become BundleIntegrityError."""
    members = {p.relative_to(bundle_dir).as_posix(): p.read_bytes() for p in sorted(bundle_dir.rglob("*")) if p.is_file()}
    path = write_zip(tmp_path / "b.zip", members, zipfile.ZIP_DEFLATED)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("references.npy")
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    data[start + info.compress_size // 2] ^= 0x55
    path.write_bytes(bytes(data))
    with pytest.raises(BundleIntegrityError):
        load(path)


# -- another model, another format ------------------------------------------------------------
@pytest.fixture(scope="module")
def foreign_model(bundle_dir) -> bytes:
    return other_model((bundle_dir / "model.tflite").read_bytes())


def test_swapped_model_rehashed(bundle_copy, foreign_model):
    (bundle_copy / "model.tflite").write_bytes(foreign_model)
    rehash(bundle_copy, "model.tflite")
    with pytest.raises(ModelMismatchError, match="not the model"):
        load(bundle_copy)


def test_swapped_model_with_its_id(bundle_copy, foreign_model):
    from auditlens.device_app.interpreter import model_id_of

    (bundle_copy / "model.tflite").write_bytes(foreign_model)
    rehash(bundle_copy, "model.tflite", model={"file": "model.tflite", "id": model_id_of(foreign_model)})
    with pytest.raises(ModelMismatchError, match="re-enrol"):
        load(bundle_copy)


def test_swapped_model_fully_consistent_manifest(bundle_copy, foreign_model):
    """Every id rewritten: the bundle loads, but the probe latent betrays the model."""
    from auditlens.device_app.interpreter import model_id_of
    from auditlens.device_app.verifier import Verifier

    new_id = model_id_of(foreign_model)
    (bundle_copy / "model.tflite").write_bytes(foreign_model)
    rehash(bundle_copy, "model.tflite", model={"file": "model.tflite", "id": new_id},
           references_model_id=new_id)
    load(bundle_copy)
    with pytest.raises(ModelMismatchError, match="probe cosine"):
        Verifier(bundle_copy)


def test_separately_installed_model_mismatch(bundle_dir, foreign_model):
    from auditlens.device_app.verifier import Verifier

    with pytest.raises(ModelMismatchError, match="does not belong to bundle"):
        Verifier(bundle_dir, model=foreign_model)


def test_cli_verify_with_swapped_model(bundle_copy, foreign_model, capsys, tmp_path):
    from .corpus import encode, product_image

    (bundle_copy / "model.tflite").write_bytes(foreign_model)
    rehash(bundle_copy, "model.tflite")
    photo = tmp_path / "p.jpg"
    photo.write_bytes(encode(product_image(0)))
    assert main(["verify", "--bundle", str(bundle_copy), "--product", "product-0", str(photo)]) == 2
    assert "not the model" in capsys.readouterr().err


@pytest.mark.parametrize("version", [0, 3, "1", None])
def test_other_format_version(bundle_copy, version):
    rehash(bundle_copy, format_version=version)
    with pytest.raises(BundleFormatError, match="format version .*re-run `auditlens enroll`"):
        load(bundle_copy)


def test_not_a_bundle_manifest(bundle_copy):
    (bundle_copy / "manifest.json").write_text('{"format": "something-else"}')
    with pytest.raises(BundleFormatError, match="not an auditlens bundle"):
        load(bundle_copy)


def test_two_products_sharing_a_code(bundle_copy):
    products = json.loads((bundle_copy / "products.json").read_bytes())
    products[0]["code"] = products[1]["code"] = "7310865000000"
    (bundle_copy / "products.json").write_text(json.dumps(products))
    rehash(bundle_copy, "products.json")
    with pytest.raises(BundleFormatError, match="two products share a code"):
        load(bundle_copy)


def test_missing_file(bundle_copy):
    (bundle_copy / "references.npy").unlink()
    with pytest.raises(BundleFormatError, match="no references.npy"):
        load(bundle_copy)


def test_no_bundle_at_path(tmp_path):
    with pytest.raises(BundleFormatError, match="no bundle here"):
        load(tmp_path / "nothing")


# -- signatures ------------------------------------------------------------------------------
def test_signed_bundle_accepted_with_right_key(signed_bundle, keypair):
    from auditlens.device_app.signing import fingerprint

    public_pem = keypair[1].read_bytes()
    b = load(signed_bundle, public_key=public_pem)
    assert b.signed_by == fingerprint(public_pem) and b.signed_by.startswith("ed25519:")
    # the same key as raw bytes and as hex text
    from cryptography.hazmat.primitives import serialization

    raw = serialization.load_pem_public_key(public_pem).public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert load(signed_bundle, public_key=raw).signed_by == b.signed_by
    assert load(signed_bundle, public_key=raw.hex() + "\n").signed_by == b.signed_by
    # with no key configured, a signed bundle loads like any other
    assert load(signed_bundle).signed_by is None


def test_unsigned_bundle_refused_with_key(bundle_dir, keypair):
    with pytest.raises(BundleSignatureError, match="not signed"):
        load(bundle_dir, public_key=keypair[1].read_bytes())


def test_wrong_key_refused(signed_bundle, tmp_path):
    from auditlens.device_app.signing import generate_keypair

    _, other_public = generate_keypair(tmp_path / "other")
    with pytest.raises(BundleSignatureError, match="does not verify"):
        load(signed_bundle, public_key=other_public.read_bytes())


def _signed_copy(signed_bundle: Path, tmp_path: Path, **changes) -> Path:
    members = zip_members(signed_bundle)
    members.update(changes)
    return write_zip(tmp_path / "tampered.zip", members)


def test_tampered_threshold_after_signing(signed_bundle, keypair, tmp_path):
    manifest = json.loads(zip_members(signed_bundle)["manifest.json"])
    manifest["decision"]["threshold"] = -1.0  # every photo would match
    path = _signed_copy(signed_bundle, tmp_path, **{"manifest.json": json.dumps(manifest, indent=1).encode()})
    assert load(path).threshold == -1.0  # unsigned-mode devices cannot tell ...
    with pytest.raises(BundleSignatureError, match="does not verify"):
        load(path, public_key=keypair[1].read_bytes())  # ... a configured device can


def test_tampered_references_after_signing(signed_bundle, keypair, tmp_path):
    """Swapped latents with the hash rewritten: the manifest changed, so its signature fails."""
    members = zip_members(signed_bundle)
    refs = np.load(__import__("io").BytesIO(members["references.npy"]))
    buf = __import__("io").BytesIO()
    np.save(buf, refs[::-1].copy())
    manifest = json.loads(members["manifest.json"])
    manifest["files"]["references.npy"] = hashlib.sha256(buf.getvalue()).hexdigest()
    path = _signed_copy(signed_bundle, tmp_path, **{"references.npy": buf.getvalue(),
                                                    "manifest.json": json.dumps(manifest, indent=1).encode()})
    with pytest.raises(BundleSignatureError, match="does not verify"):
        load(path, public_key=keypair[1].read_bytes())


def test_tampered_file_keeps_signature_but_fails_hash(signed_bundle, keypair, tmp_path):
    members = zip_members(signed_bundle)
    model = bytearray(members["model.tflite"])
    model[len(model) // 2] ^= 1
    path = _signed_copy(signed_bundle, tmp_path, **{"model.tflite": bytes(model)})
    with pytest.raises(BundleIntegrityError, match="model.tflite"):
        load(path, public_key=keypair[1].read_bytes())


@pytest.mark.parametrize("signature", [b"", b"\0" * 64, b"short", b"x" * 200])
def test_bad_signature_file(signed_bundle, keypair, tmp_path, signature):
    path = _signed_copy(signed_bundle, tmp_path, **{"manifest.sig": signature})
    with pytest.raises(BundleSignatureError):
        load(path, public_key=keypair[1].read_bytes())


@pytest.mark.parametrize("key", [b"", b"not a key", b"-----BEGIN PUBLIC KEY-----\ngarbage\n-----END PUBLIC KEY-----\n",
                                 "zz" * 32, b"\x01" * 31])
def test_bad_public_key(signed_bundle, key):
    with pytest.raises(BundleSignatureError):
        load(signed_bundle, public_key=key)


def test_private_key_given_as_public_key(signed_bundle, keypair):
    with pytest.raises(BundleSignatureError, match="private key"):
        load(signed_bundle, public_key=keypair[0].read_bytes())


def test_sign_verify_roundtrip_and_key_forms(keypair):
    from auditlens.device_app.signing import (
        load_private_key,
        sign_manifest,
        verify_manifest_signature,
    )

    private_pem, public_pem = keypair[0].read_bytes(), keypair[1].read_bytes()
    signature = sign_manifest(b'{"a": 1}', private_pem)
    assert len(signature) == 64
    fp = verify_manifest_signature(b'{"a": 1}', signature, public_pem)
    from cryptography.hazmat.primitives import serialization

    seed = load_private_key(private_pem).private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    assert sign_manifest(b'{"a": 1}', seed) == signature  # Ed25519 is deterministic
    assert sign_manifest(b'{"a": 1}', seed.hex()) == signature
    with pytest.raises(BundleSignatureError):
        verify_manifest_signature(b'{"a": 2}', signature, public_pem)
    with pytest.raises(BundleSignatureError, match="public key"):
        sign_manifest(b"x", public_pem)
    assert fp.startswith("ed25519:") and len(fp) == 8 + 16


@needs_signing
def test_keygen_cli(tmp_path, capsys):
    out = tmp_path / "keys"
    assert main(["keygen", "--out", str(out)]) == 0
    private, public = out / "publisher.key", out / "publisher.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert private.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert public.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    assert "ed25519:" in capsys.readouterr().out
    before = private.read_bytes()
    assert main(["keygen", "--out", str(out)]) == 2  # never overwrites a key silently
    assert "exists already" in capsys.readouterr().err
    assert private.read_bytes() == before
    assert main(["keygen", "--out", str(out), "--force"]) == 0
    assert private.read_bytes() != before


@needs_signing
def test_cli_sign_enroll_and_verify(tmp_path, catalog_dir, model_path, capsys):
    """The whole publisher → device path through the CLI."""
    from .corpus import encode, product_image

    keys = tmp_path / "keys"
    assert main(["keygen", "--out", str(keys)]) == 0
    signed = tmp_path / "signed"
    assert main(["enroll", str(catalog_dir), "--model", str(model_path), "--out", str(signed),
                 "--sign-key", str(keys / "publisher.key"), "--no-progress"]) == 0
    assert (signed / "manifest.sig").stat().st_size == 64
    capsys.readouterr()
    assert main(["info", str(signed), "--public-key", str(keys / "publisher.pub")]) == 0
    assert "signed by ed25519:" in capsys.readouterr().out
    photo = tmp_path / "p.jpg"
    photo.write_bytes(encode(product_image(2)))
    rc = main(["verify", "--bundle", str(signed), "--public-key", str(keys / "publisher.pub"),
               "--product", "product-2", str(photo)])
    assert rc in (0, 1, 3)
    # a device holding another publisher's key refuses it
    assert main(["keygen", "--out", str(tmp_path / "k2")]) == 0
    capsys.readouterr()
    assert main(["verify", "--bundle", str(signed), "--public-key", str(tmp_path / "k2" / "publisher.pub"),
                 "--product", "product-2", str(photo)]) == 2
    assert "does not verify" in capsys.readouterr().err


def test_engine_without_cryptography(bundle_dir, signed_bundle, tmp_path):
    """No key configured: the engine loads bundles (signed or not) without `cryptography`;
    with a key, a missing `cryptography` is a clear BundleSignatureError."""
    script = f"""
import sys
sys.modules['cryptography'] = None  # as if not installed
from auditlens.device_app.bundle import ReferenceBundle
from auditlens.errors import BundleSignatureError
ReferenceBundle.load({str(bundle_dir)!r})
ReferenceBundle.load({str(signed_bundle)!r})
try:
    ReferenceBundle.load({str(signed_bundle)!r}, public_key=b'x' * 32)
except BundleSignatureError as exc:
    assert 'cryptography' in str(exc), exc
    print('OK')
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0 and proc.stdout.strip() == "OK", proc.stderr


def test_failed_zip_loads_leave_no_file_open(bundle_dir, tmp_path):
    """A refused zip bundle must not keep its file open while the error lives (the app
    shows the error and keeps it; a service retries): one descriptor per try otherwise."""
    members = {p.relative_to(bundle_dir).as_posix(): p.read_bytes() for p in sorted(bundle_dir.rglob("*")) if p.is_file()}
    members["model.tflite"] = members["model.tflite"][:-1] + b"x"
    path = write_zip(tmp_path / "bad.zip", members)
    good = _zip_of(bundle_dir, tmp_path / "good.zip")
    before = len(os.listdir("/proc/self/fd"))
    kept = []
    for _ in range(20):
        with pytest.raises(BundleIntegrityError) as info:
            ReferenceBundle.load(path)
        kept.append(info.value)
        kept.append(ReferenceBundle.load(good))
    assert len(os.listdir("/proc/self/fd")) == before
