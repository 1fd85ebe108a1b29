"""Ed25519 signatures: of reference bundles by their publisher, and of audit records by
the device that wrote them.

A publisher signs ``manifest.json`` (which holds the sha256 of every other file of the
bundle) with its private key; the signature is stored beside it as ``manifest.sig`` (the
raw 64 signature bytes). A device configured with the publisher's public key then refuses
unsigned bundles and bundles signed by anyone else, so nobody can swap in references that
make fake audits pass.

The ``cryptography`` package (the ``[sign]`` extra) is imported only when a key
is actually used: a device with no key configured never needs it.

Keys:

* private: PEM (PKCS#8, unencrypted, as written by ``auditlens keygen``), or the raw 32
  byte seed, or those 32 bytes as 64 hex digits;
* public: PEM (SubjectPublicKeyInfo), the raw 32 bytes, or 64 hex digits.

The *fingerprint* of a public key is ``ed25519:`` followed by the first 16 hex digits of
the sha256 of its raw 32 bytes; :func:`verify_manifest_signature` returns it so that
``auditlens info`` can say who signed a bundle.

A device key (``auditlens keygen --device``: ``device.key``, ``device.pub``) signs each
record the device appends to its audit log (:mod:`~auditlens.device_app.auditlog`); an
auditor holding the device's public key then knows that every signed record was written
by whoever holds that key, and unchanged since.
"""

from __future__ import annotations

import argparse
import binascii
import hashlib
import os
import shlex
from pathlib import Path

from auditlens.errors import AuditlensError, BundleSignatureError

PRIVATE_KEY_FILE = "publisher.key"
PUBLIC_KEY_FILE = "publisher.pub"
DEVICE_KEY_FILES = ("device.key", "device.pub")
"""(private, public) file names ``auditlens keygen --device`` writes."""
SIGNATURE_SIZE = 64
KEY_SIZE = 32


class KeyFileError(AuditlensError):
    """A key could not be written (exists already, or the folder is not writable)."""


def _crypto():
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise BundleSignatureError(
            "signatures need the `cryptography` package: the [sign] extra (pip install "
            f"'.[sign]' in an auditlens checkout, or pip install cryptography) ({exc})"
        ) from exc
    return ed25519, serialization, InvalidSignature


def require_cryptography() -> None:
    """Raise :class:`BundleSignatureError` saying how to install it when `cryptography`
    is missing (before a key is read, so that its absence is not taken for a bad key)."""
    _crypto()


def _as_bytes(key: bytes | bytearray | str | os.PathLike) -> bytes:
    if isinstance(key, os.PathLike):
        return read_key_file(key, "key file")
    if isinstance(key, str):
        return key.encode("utf-8", "surrogateescape")
    if isinstance(key, (bytes, bytearray, memoryview)):
        return bytes(key)
    raise BundleSignatureError(f"a key must be bytes or text, not {type(key).__name__}")


def read_key_file(path: str | os.PathLike | None, role: str) -> bytes | None:
    """The bytes of the key file a command line names (``None`` for none); ``role`` says
    which key it should be, for the error when it cannot be read."""
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise BundleSignatureError(f"{path}: cannot read the {role} ({exc.strerror or exc}); "
                                   "`auditlens keygen` writes publisher.key (private, for signing) "
                                   "and publisher.pub (public, for checking)") from exc


def _path_hint(key) -> str:
    """A hint when a key given as text is the name of a file (text is read as the key)."""
    if isinstance(key, str) and len(key) < 4096 and "\n" not in key:
        try:
            if Path(key).is_file():
                return f"; {key!r} names a file: pass it as a path, pathlib.Path({key!r})"
        except (OSError, ValueError):
            pass
    return ""


def _hex32(data: bytes) -> bytes | None:
    text = data.strip()
    if len(text) != 2 * KEY_SIZE:
        return None
    try:
        return binascii.unhexlify(text)
    except (binascii.Error, ValueError):
        return None


def _raw_public(public_key) -> bytes:
    _, serialization, _ = _crypto()
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def fingerprint(public_key: bytes | str) -> str:
    """``ed25519:`` + the first 16 hex digits of the sha256 of the raw public key."""
    return _fingerprint_of(_raw_public(load_public_key(public_key)))


def _fingerprint_of(raw: bytes) -> str:
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:16]


def load_private_key(private_key: bytes | str | os.PathLike):
    """An ``Ed25519PrivateKey`` from PEM, raw 32 bytes or 64 hex digits."""
    ed25519, serialization, _ = _crypto()
    data = _as_bytes(private_key)
    if b"-----BEGIN" in data:
        if b"PUBLIC KEY" in data and b"PRIVATE KEY" not in data:
            raise BundleSignatureError("this is a public key; signing needs the private key "
                                       "(the .key file from `auditlens keygen`)")
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except TypeError as exc:  # encrypted PEM
            raise BundleSignatureError(f"the private key is password-protected, which auditlens "
                                       f"does not support: {exc}") from exc
        except (ValueError, binascii.Error) as exc:
            raise BundleSignatureError(f"the private key is not a readable PEM key: {exc}") from exc
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise BundleSignatureError(f"the private key is a {type(key).__name__}, not an Ed25519 "
                                       "key; make one with `auditlens keygen`")
        return key
    raw = data if len(data) == KEY_SIZE else _hex32(data)
    if raw is None:
        raise BundleSignatureError(
            f"the private key is neither PEM, 32 raw bytes nor 64 hex digits ({len(data)} bytes)"
            + _path_hint(private_key))
    return ed25519.Ed25519PrivateKey.from_private_bytes(raw)


def load_public_key(public_key: bytes | str | os.PathLike):
    """An ``Ed25519PublicKey`` from PEM, raw 32 bytes or 64 hex digits."""
    ed25519, serialization, _ = _crypto()
    data = _as_bytes(public_key)
    if b"-----BEGIN" in data:
        if b"PRIVATE KEY" in data:
            raise BundleSignatureError("this is a private key; give the public key (the .pub "
                                       "file from `auditlens keygen`) and keep the private one "
                                       "where it was made")
        try:
            key = serialization.load_pem_public_key(data)
        except (ValueError, binascii.Error) as exc:
            raise BundleSignatureError(f"the public key is not a readable PEM key: {exc}") from exc
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise BundleSignatureError(f"the public key is a {type(key).__name__}, not an Ed25519 key")
        return key
    raw = data if len(data) == KEY_SIZE else _hex32(data)
    if raw is None:
        raise BundleSignatureError(
            f"the public key is neither PEM, 32 raw bytes nor 64 hex digits ({len(data)} bytes)"
            + _path_hint(public_key))
    try:
        return ed25519.Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise BundleSignatureError(f"not a valid Ed25519 public key: {exc}") from exc


def public_key_of(private_key: bytes | str | os.PathLike) -> bytes:
    """The raw 32-byte public key of ``private_key`` (raises :class:`BundleSignatureError`
    for a key that is not a usable Ed25519 private key): check a key before long work."""
    return _raw_public(load_private_key(private_key).public_key())


def public_hex(public_key) -> str:
    """The 64 hex digits of an ``Ed25519PublicKey`` (as audit records name their signer)."""
    return _raw_public(public_key).hex()


def fingerprint_hex(raw_hex: str) -> str:
    """The fingerprint of a public key given as 64 hex digits (no `cryptography` needed)."""
    return _fingerprint_of(bytes.fromhex(raw_hex))


def signature_holds(message: bytes, signature: bytes, public_key) -> bool:
    """Whether ``signature`` is ``public_key``'s (an ``Ed25519PublicKey``, or PEM, raw or
    hex bytes) signature of ``message``."""
    _, _, InvalidSignature = _crypto()
    key = public_key if hasattr(public_key, "verify") else load_public_key(public_key)
    try:
        key.verify(bytes(signature), bytes(message))
    except InvalidSignature:
        return False
    return True


def sign_manifest(manifest_bytes: bytes, private_key: bytes | str | os.PathLike) -> bytes:
    """The 64-byte Ed25519 signature of ``manifest_bytes``."""
    return load_private_key(private_key).sign(bytes(manifest_bytes))


def verify_manifest_signature(
    manifest_bytes: bytes,
    signature: bytes | None,
    public_key: bytes | str | os.PathLike,
    *,
    where: str = "bundle",
) -> str:
    """Check ``signature`` of ``manifest_bytes`` with ``public_key``; return the key's
    fingerprint, or raise :class:`BundleSignatureError`."""
    _, _, InvalidSignature = _crypto()
    key = load_public_key(public_key)
    if signature is None or len(signature) == 0:
        raise BundleSignatureError(f"{where}: the bundle is not signed, and this device only "
                                   "accepts bundles signed by its publisher")
    signature = bytes(signature)
    if len(signature) != SIGNATURE_SIZE:
        raise BundleSignatureError(f"{where}: manifest.sig holds {len(signature)} bytes, not a "
                                   f"{SIGNATURE_SIZE}-byte Ed25519 signature")
    try:
        key.verify(signature, bytes(manifest_bytes))
    except InvalidSignature:
        raise BundleSignatureError(
            f"{where}: the signature does not verify with the configured publisher key "
            f"{fingerprint(public_key)}: the bundle was signed by someone else or changed after "
            "signing; do not use it, reinstall it from the publisher"
        ) from None
    return _fingerprint_of(_raw_public(key))


def generate_keypair(directory: str | os.PathLike, *, force: bool = False,
                     device: bool = False) -> tuple[Path, Path]:
    """Write a new Ed25519 key pair into ``directory``: ``publisher.key`` (PKCS#8 PEM,
    mode 0600) and ``publisher.pub`` (SubjectPublicKeyInfo PEM), or ``device.key`` and
    ``device.pub`` for a device that signs its audit records (``device``). Existing keys
    are kept unless ``force``. Returns (private path, public path)."""
    ed25519, serialization, _ = _crypto()
    private_path, public_path = _key_paths(directory, device=device)
    if not force:
        for p in (private_path, public_path):
            if p.exists() or p.is_symlink():
                lost = "" if public_path.exists() or public_path.is_symlink() else (
                    f"; if only {public_path.name} was lost, --restore-public writes it again")
                what = ("the device's audit records signed with the old key will then need the old "
                        "public key to be checked" if device else
                        "bundles signed with the old key will then be refused")
                raise KeyFileError(f"{p} exists already; keep it, or pass --force to replace the "
                                   f"key pair ({what})" + lost)
    key = ed25519.Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    _write_private(private_path, private_pem)
    _write_atomic(public_path, _public_pem(key), 0o644)
    return private_path, public_path


def restore_public_key(directory: str | os.PathLike, *, device: bool = False) -> tuple[Path, Path]:
    """Write ``publisher.pub`` (``device.pub``) again from the ``.key`` beside it (a public
    key lost or deleted; the key pair, and so every signature made with it, stays valid).
    Returns (private path, public path), as :func:`generate_keypair`."""
    private_path, public_path = _key_paths(directory, create=False, device=device)
    if public_path.exists() or public_path.is_symlink():
        raise KeyFileError(f"{public_path} exists already; nothing to restore")
    try:
        private_pem = private_path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"{private_path}: cannot read the private key to restore its public "
                           f"key from: {exc}") from exc
    _write_atomic(public_path, _public_pem(load_private_key(private_pem)), 0o644)
    return private_path, public_path


def _public_pem(private_key) -> bytes:
    """The SubjectPublicKeyInfo PEM of an ``Ed25519PrivateKey``."""
    _, serialization, _ = _crypto()
    return private_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo)


def _key_paths(directory: str | os.PathLike, *, create: bool = True,
               device: bool = False) -> tuple[Path, Path]:
    """(private, public) key paths in ``directory`` (a device's or a publisher's), made
    first when ``create``."""
    directory = Path(directory)
    if create:
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise KeyFileError(f"{directory}: cannot create the key folder: {exc}") from exc
    names = DEVICE_KEY_FILES if device else (PRIVATE_KEY_FILE, PUBLIC_KEY_FILE)
    return directory / names[0], directory / names[1]


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            if hasattr(os, "fchmod"):  # whatever the umask (POSIX; Windows has no such modes)
                os.fchmod(fd, mode)
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise KeyFileError(f"{path}: cannot write the key: {exc}") from exc


def _write_private(path: Path, data: bytes) -> None:
    # created 0600 from the first byte on: the key is never readable by others
    _write_atomic(path, data, 0o600)


# -- `auditlens keygen` ------------------------------------------------------------------
def add_keygen_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", "-o", type=Path, required=True,
                   help=f"folder for {PRIVATE_KEY_FILE} (private, mode 0600) and {PUBLIC_KEY_FILE}; "
                        f"with --device, {DEVICE_KEY_FILES[0]} and {DEVICE_KEY_FILES[1]}")
    p.add_argument("--device", action="store_true",
                   help=f"a device's key pair ({DEVICE_KEY_FILES[0]}, {DEVICE_KEY_FILES[1]}): the device "
                        "signs each audit record it writes with it (`verify --log-key`, the app's "
                        "--log-key), and `verify-log --device-key` checks them")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--force", action="store_true", help="replace an existing key pair")
    what.add_argument("--restore-public", action="store_true",
                      help=f"write {PUBLIC_KEY_FILE} ({DEVICE_KEY_FILES[1]} with --device) again from "
                           "the private key in --out (a lost public key; the pair stays the same)")


def run_keygen(args) -> int:
    device = args.device
    if args.restore_public:
        private_path, public_path = restore_public_key(args.out, device=device)
        print(f"public key   {public_path} written again from {private_path}")
    else:
        private_path, public_path = generate_keypair(args.out, force=args.force, device=device)
        key = shlex.quote(str(private_path))
        use = (f"keep it on the device alone; sign its audit records with `auditlens verify --log "
               f"AUDIT.db --log-key {key}`" if device else
               f"keep it with the publisher; sign with `auditlens enroll --sign-key {key}`")
        print(f"private key  {private_path}  (mode 0600: {use})")
    pub = shlex.quote(str(public_path))
    share = (f"give it to the auditors: `auditlens verify-log AUDIT.db --device-key {pub}`" if device
             else f"install it on devices: `auditlens verify --public-key {pub}`")
    print(f"public key   {public_path}  ({fingerprint(public_path.read_bytes())}; {share})")
    return 0
