"""What an audit log's record is and how a chain of records is checked, wherever it is kept.

A record's fields and the canonical bytes its hash covers (:func:`canonical_bytes`), the
messages a device key signs for a record and for an export (:func:`signed_message`,
:func:`export_signed_message`), and the checks every record of a chain passes, oldest
first (:class:`ChainWalk`: its id and ``prev_hash`` follow the record before, its hash
covers its fields, its photo matches its sha256, it agrees with its own verdict, and its
signature holds, with the device keys when they are given).
:class:`~auditlens.device_app.auditlog.AuditLog` walks its SQLite file with it;
:func:`verify_export` walks a JSON export, so an auditor checks an upload without the
device's database.

This module is part of the engine: stdlib only (signatures through
:mod:`auditlens.device_app.signing` and the optional ``cryptography``), no TensorFlow, no Kivy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from auditlens.errors import AuditChainError, AuditlensError, AuditLogError

LOG_FORMAT = "auditlens-audit-log"
LOG_VERSION = 1
EXPORT_VERSION = 2
"""Of a JSON export: 2 since a header's ``judged_with`` runs are keyed on the bundle's
threshold (a second look's verdict carries its own); a reader of version 1 would take such
a header for an edited one, so it is told the version instead."""
EXPORT_VERSIONS_READ = (1, 2)
GENESIS_HASH = "0" * 64
MAX_RECORD_ID = 2**63 - 1
"""The largest id a record can have (SQLite's largest integer); a larger one names no record."""
"""``prev_hash`` of the first record."""

HASHED_FIELDS = (
    "id", "created_utc", "auditor", "device", "product_id", "decision", "score",
    "threshold", "model_id", "photo_sha256", "captured_sha256", "verdict_json", "prev_hash",
)
"""The fields a record's hash covers, in this order (the photo through its sha256)."""

VERDICT_COLUMNS = ("product_id", "decision", "score", "threshold", "model_id")
"""Record columns that repeat a field of the record's verdict."""

CSV_COLUMNS = (
    "id", "created_utc", "auditor", "device", "product_id", "decision", "score", "threshold",
    "model_id", "photo_sha256", "captured_sha256", "reasons", "prev_hash", "record_hash",
    "signed_by", "bundle_id", "first_score", "first_threshold",
)
_CSV_ONLY = ("reasons", "signed_by", "bundle_id", "first_score", "first_threshold")
"""CSV columns made for people from other fields: the reasons joined, the fingerprint of
the key that signed the record (the JSON export gives the key itself, ``signer``), and
from the verdict the bundle judged against and, when a second look decided, the first
score and the bundle's threshold it was compared with (``threshold`` is then the second
look's)."""

PHOTO_SUFFIX = {"image/jpeg": "jpg", "image/png": "png"}

PHOTO_MIMES = (*PHOTO_SUFFIX, "application/octet-stream")
"""Every photo type auditlens writes (the last: a photo kept as it came, undecodable). The
type is not hashed, so a record carrying any other text was edited."""


RECORD_COLUMNS = ("id", "created_utc", "auditor", "device", "product_id", "decision", "score",
                 "threshold", "model_id", "photo_sha256", "captured_sha256", "verdict_json",
                 "prev_hash", "record_hash", "photo_mime")


@dataclass(frozen=True)
class AuditRecord:
    """One verification as the log keeps it (the photo itself:
    :meth:`~auditlens.device_app.auditlog.AuditLog.photo`)."""

    id: int
    created_utc: str
    auditor: str
    device: str
    product_id: str
    decision: str
    score: float
    threshold: float
    model_id: str
    photo_sha256: str
    """sha256 of the photo bytes stored in the log."""
    captured_sha256: str
    """sha256 of the photo bytes as captured (differs from ``photo_sha256`` only when the
    capture was larger than :data:`~auditlens.device_app.auditlog.MAX_PHOTO_SIDE` and was
    downscaled for storage)."""
    verdict_json: str
    prev_hash: str
    record_hash: str
    photo_mime: str = "image/jpeg"
    signer: str = ""
    """The public key (64 hex digits) of the device key that signed the record; "" unsigned."""
    signature: str = ""
    """Ed25519 signature (128 hex digits) of :func:`signed_message` of the log's id and the
    record's hash."""

    @property
    def verdict(self) -> dict:
        return json.loads(self.verdict_json)

    def verdict_value(self, key: str, default=None):
        """One field of the stored verdict, or ``default`` when the verdict does not parse
        (a log edited by hand must still be listed, not crash what lists it)."""
        try:
            return self.verdict.get(key, default)
        except (ValueError, AttributeError, RecursionError):
            return default

    @property
    def reasons(self) -> list[str]:
        reasons = self.verdict_value("reasons", [])
        return [str(r) for r in reasons] if isinstance(reasons, list) else []

    def hashed_fields(self) -> dict:
        return {name: getattr(self, name) for name in HASHED_FIELDS}

    def to_dict(self, *, verdict: bool = True) -> dict:
        d = {name: getattr(self, name) for name in CSV_COLUMNS if name not in _CSV_ONLY}
        d["photo_mime"] = self.photo_mime
        if self.signer or self.signature:
            d["signer"], d["signature"] = self.signer, self.signature
        if verdict:
            d["verdict"] = self.verdict
        return d


@dataclass(frozen=True)
class ChainReport:
    """What :meth:`~auditlens.device_app.auditlog.AuditLog.verify_chain` checked."""

    path: str
    records: int
    head_hash: str
    """``record_hash`` of the newest record (the genesis hash for an empty log): keep it
    when the log is uploaded, to show later that no newest record was removed."""
    log_id: str
    triggers_intact: bool
    """False when the append-only triggers were removed (someone opened the file by hand)."""
    first_created_utc: str = ""
    last_created_utc: str = ""
    warnings: tuple[str, ...] = field(default_factory=tuple)
    signed_by: tuple[dict, ...] = field(default_factory=tuple, compare=False)
    """Runs of consecutive records signed by the same device key, oldest first:
    ``{"first_id", "last_id", "key"}`` (the key's fingerprint; "" for unsigned records)."""
    device_keys_checked: bool = False
    """The check was given the device keys (every record from the first signed one on was
    signed by one of them); False: signatures were only checked against the key they name."""
    judged_with: tuple[dict, ...] = field(default_factory=tuple, compare=False)
    """Runs of consecutive records judged with the same model, bundle and threshold, oldest
    first: ``{"first_id", "last_id", "model_id", "bundle_id", "threshold"}`` (the
    bundle id is "" for verdicts that do not name one; the threshold is the bundle's, which
    a verdict that took a second look compared its first score with); over the records this
    check read (a check ``since`` an earlier head reads only the newer ones)."""
    head_signed_by: str = ""
    """A JSON export whose header a device key signed: that key's fingerprint (its head,
    warnings and guards' state are then the device's word); "" otherwise."""
    exported_utc: str = ""
    """When the device made that signed export ("" for an unsigned one, or a log)."""
    photos_checked: bool = True
    """False for a JSON export made without its photos: the records' photo hashes were
    checked against nothing (not a warning: the hashes still bind each record's photo)."""
    notes: tuple[str, ...] = field(default_factory=tuple, compare=False)
    """What the check was asked to allow and found (the records before ``--signed-from``
    not held to the device keys): said, but not warnings, so ``--strict`` passes them. Not
    in :meth:`to_dict`, which an export's header repeats."""

    @property
    def head(self) -> str:
        """``ID:HASH`` of the newest record, as ``verify-log --expect-head`` takes it."""
        return f"{self.records}:{self.head_hash}"

    def to_dict(self) -> dict:
        return {
            "path": self.path, "records": self.records, "head_hash": self.head_hash,
            "head": self.head,
            "log_id": self.log_id, "triggers_intact": self.triggers_intact,
            "first_created_utc": self.first_created_utc,
            "last_created_utc": self.last_created_utc, "warnings": list(self.warnings),
            "signed_by": [dict(run) for run in self.signed_by],
            "device_keys_checked": self.device_keys_checked,
            "judged_with": [dict(run) for run in self.judged_with],
            "head_signed_by": self.head_signed_by, "exported_utc": self.exported_utc,
            "photos_checked": self.photos_checked,
        }


def canonical_bytes(fields: dict) -> bytes:
    """The exact bytes a record's hash is computed over: JSON of :data:`HASHED_FIELDS`
    with sorted keys, no spaces, UTF-8 (floats in Python's shortest round-trip form)."""
    missing = [k for k in HASHED_FIELDS if k not in fields]
    if missing:
        raise AuditLogError(f"a record lacks the fields {missing}")
    body = {k: fields[k] for k in HASHED_FIELDS}
    body["id"] = int(body["id"])
    body["score"] = float(body["score"])
    body["threshold"] = float(body["threshold"])
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def record_hash(fields: dict) -> str:
    return hashlib.sha256(canonical_bytes(fields)).hexdigest()


def signed_message(log_id: str, record_hash_hex: str) -> bytes:
    """The bytes a device key signs for a record: the log's id (a record cannot pass for
    one of another log) and the record's hash, which covers every field and, through
    ``prev_hash``, every record before it."""
    return f"{LOG_FORMAT} {log_id} record {record_hash_hex}".encode("utf-8", "surrogateescape")


def export_signed_message(header: dict, *, photos: bool, exported_utc: str) -> bytes:
    """The bytes a device key signs for a JSON export: what its header says about the log
    (its id, its head, whether the append-only guards were intact, its warnings), whether
    the export carries the photos, and when it was made, as canonical JSON."""
    body = {"log_id": header.get("log_id"), "head": header.get("head"),
            "triggers_intact": header.get("triggers_intact"), "warnings": header.get("warnings"),
            "photos": photos, "exported_utc": exported_utc}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))  # ASCII: any text encodes
    return f"{LOG_FORMAT} export {text}".encode("ascii")


def sniffed_mime(data: bytes) -> str:
    """The image type the stored bytes themselves declare (JPEG, PNG, else unknown)."""
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    return "application/octet-stream"


_SURROGATES = re.compile("[\ud800-\udfff]")


def storable_text(value) -> str:
    """``value`` as text SQLite and the hash can take: characters UTF-8 cannot encode
    (bytes Python decoded with ``surrogateescape``, such as a Latin-1 ``$USER``) become
    U+FFFD, so the record is kept rather than lost."""
    return _SURROGATES.sub("\ufffd", str(value))


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_text(value: str) -> str:
    """Free text (an auditor's or device's name) for a CSV cell that a spreadsheet may
    open: text that starts as a formula would (``= + - @``, a tab or a carriage return)
    gets a leading apostrophe, so the spreadsheet shows it and does not run it (CSV
    injection, e.g. an auditor named ``=HYPERLINK(...)``). The log and the JSON export
    keep the text as it was typed."""
    return "'" + value if value.startswith(_FORMULA_START) else value


def verdict_text(verdict_d: dict) -> str:
    return storable_text(json.dumps(verdict_d, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                            default=str))



def verify_export(path: str | os.PathLike, *, anchors: Sequence[tuple[int, str]] = (),
                  device_keys: Sequence[bytes | str | os.PathLike] = (),
                  signed_from: int = 1) -> ChainReport:
    """Check a JSON export (``verify-log --export-json``) as
    :meth:`~auditlens.device_app.auditlog.AuditLog.verify_chain` checks a log: the chain of
    its records, each record's hash and signature, its photo when the export carries photos
    (``--photos``), and the head its header names; ``anchors``, ``device_keys`` and
    ``signed_from`` as for :meth:`~auditlens.device_app.auditlog.AuditLog.verify_chain`.
    An auditor given an upload checks it without the device's database. The whole file is
    read into memory.

    The header's ``warnings`` (the append-only guards found removed on the device) and
    ``triggers_intact`` are the device's word: repeated, not checked. An export made with
    the device's key carries its signature of them and of the head (``attestation``), which
    must then verify, with one of ``device_keys`` when they are given: records removed from
    its end, or warnings left out, are refused (:class:`AuditChainError`). An export
    without one gets a warning when its records are signed or ``device_keys`` are given:
    its end, and its warnings, could have been cut unnoticed (check the ``.db``, or against
    a kept head). The header's summary of the records (count, head hash, times, signers,
    settings) must be what the records give, and a JSON key written twice is refused."""
    import base64

    path = Path(path)
    try:
        data = json.loads(path.read_bytes(), object_pairs_hook=_refuse_repeated_keys)
    except OSError as exc:
        raise AuditLogError(f"{path}: cannot read it: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise AuditLogError(f"{path}: not an audit log export (not valid JSON: {exc})") from exc
    if not isinstance(data, dict) or data.get("format") != LOG_FORMAT:
        raise AuditLogError(f"{path}: not an auditlens audit log export")
    if type(data.get("version")) is not int or data["version"] not in EXPORT_VERSIONS_READ:  # not true
        raise AuditLogError(f"{path}: audit log export version {data.get('version')!r}, this "
                            f"auditlens reads versions {', '.join(map(str, EXPORT_VERSIONS_READ))}")
    header, records = data.get("log"), data.get("records")
    if not isinstance(header, dict) or not isinstance(records, list):
        raise AuditLogError(f"{path}: not an auditlens audit log export (no log header or records)")
    wrong = _malformed_header(header, data)
    if wrong:
        raise chain_error(f"{path}: the export's header is not well formed ({wrong}); auditlens "
                           "never writes such an export, so it was edited", None)
    kept = kept_hashes(anchors)
    walk = ChainWalk(str(path), log_id=storable_text(header.get("log_id", "")),
                      device_keys=trusted_keys(device_keys), signed_from=signed_from)
    hashes: dict[int, str] = {}
    # an export made with --photos carries every record's photo: each one is checked (an
    # export from before the "photos" flag says so by its first record)
    with_photos = data.get("photos", bool(records) and isinstance(records[0], dict)
                           and "photo_base64" in records[0])
    for n, d in enumerate(records, 1):
        try:
            verdict_json = d["verdict_json"] if "verdict_json" in d else verdict_text(d["verdict"])
            record = AuditRecord(**{k: d[k] for k in RECORD_COLUMNS if k != "verdict_json"},
                                 verdict_json=verdict_json, signer=d.get("signer", ""),
                                 signature=d.get("signature", ""))
            if ("photo_base64" in d) != with_photos:
                raise ValueError("its photo is " + ("missing from an export made with its photos"
                                                    if with_photos else "in an export made without them"))
            photo = base64.b64decode(d["photo_base64"], validate=True) if with_photos else None
        except (KeyError, TypeError, ValueError) as exc:
            raise chain_error(f"{path}: record {n} of the export is incomplete or unreadable "
                               f"({exc}); the export was edited", n) from exc
        walk.add(record, photo, photo_kept=with_photos)
        # what a reader of the export sees is the verdict object: it must be the hashed text's
        if "verdict" in d and verdict_text(d["verdict"]) != verdict_text(record.verdict):
            raise chain_error(f"{path}: record {n}: its verdict is not the verdict its hash "
                               "covers; the export was edited", n)
        if record.id in kept:
            hashes[record.id] = record.record_hash
    claimed = header.get("head")
    if claimed != f"{walk.count}:{walk.head_hash}":
        raise chain_error(f"{path}: the export's header names the head {claimed}, but its "
                           f"records end at {walk.count}:{walk.head_hash}; records were removed "
                           "from or added to the export", walk.count)
    report = walk.report(str(header.get("log_id", "")), bool(header.get("triggers_intact", True)),
                         tuple(str(w) for w in header.get("warnings") or ()))
    _check_header_agrees(str(path), header, report)
    check_kept_heads(str(path), kept, hashes.get)
    signed_by, when, more = _check_attestation(str(path), data.get("attestation"), header,
                                               with_photos, walk)
    return dataclasses.replace(report, warnings=tuple(dict.fromkeys(report.warnings + more)),
                               head_signed_by=signed_by, exported_utc=when,
                               photos_checked=with_photos or not records)


def _refuse_repeated_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object whose keys are unique: a reader that keeps the first of two "records"
    must not see another export than the one checked, which keeps the last."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"the key {twice!r} appears twice in one object")
    return out


def _malformed_header(header: dict, data: dict) -> str:
    """What is wrong with the types of an export's header ("" when nothing is)."""
    for name in ("log_id", "head", "head_hash", "first_created_utc", "last_created_utc"):
        if name in header and not isinstance(header[name], str):
            return f"its {name} is {type(header[name]).__name__}, not text"
    warnings = header.get("warnings", [])
    if not (isinstance(warnings, list) and all(isinstance(w, str) for w in warnings)):
        return "its warnings are not a list of text"
    for name, where in (("triggers_intact", header), ("photos", data)):
        if name in where and not isinstance(where[name], bool):
            return f"its {name} is {type(where[name]).__name__}, not true or false"
    if "records" in header and type(header["records"]) is not int:
        return f"its records is {type(header['records']).__name__}, not a whole number"
    return ""


def _check_header_agrees(where: str, header: dict, found: ChainReport) -> None:
    """The header's summary of the records (their count, head hash, times, signers and
    settings) is what the records themselves give (``found``): a reader of the header
    alone must not be told another story than the one checked."""
    for name, value in (("records", found.records), ("head_hash", found.head_hash),
                        ("first_created_utc", found.first_created_utc),
                        ("last_created_utc", found.last_created_utc),
                        ("signed_by", [dict(run) for run in found.signed_by]),
                        ("judged_with", [dict(run) for run in found.judged_with])):
        if name in header and header[name] != value:
            raise chain_error(f"{where}: the export's header gives its {name} as "
                               f"{json.dumps(header[name])[:120]}, but its records give "
                               f"{json.dumps(value)[:120]}; the header was edited", found.records)


def _well_formed_signature(signer, signature) -> bool:
    """A device key (64 hex digits) and an Ed25519 signature (128), as auditlens writes them."""
    return (isinstance(signer, str) and isinstance(signature, str)
            and bool(re.fullmatch(r"[0-9a-f]{64}", signer) and re.fullmatch(r"[0-9a-f]{128}", signature)))


def _check_attestation(where: str, attestation, header: dict, photos: bool,
                       walk: ChainWalk) -> tuple[str, str, tuple[str, ...]]:
    """The fingerprint of the key that signed an export's header, when it was made, and
    the warnings about it; :class:`AuditChainError` for a signature that does not hold, or
    (with device keys) one no device key made."""
    from auditlens.device_app.signing import fingerprint_hex

    if attestation is None:
        if walk.first_signed is None and walk.device_keys is None:
            return "", "", ()
        return "", "", ("the export's header is not signed (it was exported without the device's "
                        "key): records removed from its end, or warnings left out of it, would "
                        "go unnoticed; check its head against one kept earlier (--expect-head), "
                        "or export on the device",)
    fail = walk.count  # the chain reads; what is wrong is the end the header names
    try:
        signer, signature, when = (attestation[k] for k in ("signer", "signature", "exported_utc"))
        if not (isinstance(when, str) and _well_formed_signature(signer, signature)):
            raise ValueError
    except (KeyError, TypeError, ValueError):
        raise chain_error(f"{where}: the export's attestation is not well formed; auditlens "
                           "never writes such an export, so it was edited", fail) from None
    key = fingerprint_hex(signer)
    if walk.device_keys is not None and signer not in walk.device_keys:
        raise chain_error(f"{where}: the export's header is signed by the key {key}, not by the "
                           f"device keys given ({', '.join(walk.device_keys.values())}); it was "
                           "made by another device or outside auditlens", fail)
    holds = walk.holds(export_signed_message(header, photos=photos, exported_utc=when), signature, signer)
    if holds is None:
        return "", "", ("the export's header signature was not checked: the [sign] extra "
                        "(cryptography) is not installed",)
    if not holds:
        raise chain_error(f"{where}: the export's header does not match the device's signature "
                           f"of it (key {key}): records were removed from or added to its end, "
                           "its warnings were changed, or its photos removed, after the device "
                           "made it, or the signature was taken from another export", fail)
    signers = {run["key"] for run in walk.signed_by}
    warnings = () if walk.device_keys is not None or key in signers else (
        f"the export's header is signed by the key {key}, which signed none of its records "
        "(check with --device-key)",)
    return key, when, warnings


def load_signing_key(key):
    """The device's private key, and its public key as hex (raises :class:`AuditLogError`
    for a key that cannot sign)."""
    from auditlens.device_app.signing import load_private_key, public_hex

    private = _read_key(key, load_private_key, "the device key",
                        "cannot sign the audit log's records with this key")
    return private, public_hex(private.public_key())


def trusted_keys(keys: Sequence[bytes | str | os.PathLike]) -> dict[str, str] | None:
    """The devices' public keys a check holds records to, as hex -> fingerprint; None for
    no keys (signatures are then checked against the key they name)."""
    if not keys:
        return None
    from auditlens.device_app.signing import (
        fingerprint_hex,
        load_public_key,
        public_hex,
        require_cryptography,
    )

    require_cryptography()  # a missing [sign] extra is said as such, not as a bad key
    raws = [public_hex(_read_key(key, load_public_key, "the device's public key",
                                 "not a device's public key")) for key in keys]
    return {raw: fingerprint_hex(raw) for raw in raws}


def _read_key(key, loader, what: str, unusable: str):
    """``loader`` of ``key`` (a path's bytes, or the key itself); :class:`AuditLogError`
    naming the file once for a file that cannot be read (``what`` it should hold) or a key
    that is not of this kind (``unusable``)."""
    from auditlens.errors import BundleSignatureError

    is_path = isinstance(key, os.PathLike)
    try:
        return loader(Path(key).read_bytes() if is_path else key)
    except OSError as exc:
        raise AuditLogError(f"{key}: cannot read {what}: {exc.strerror or exc}") from exc
    except BundleSignatureError as exc:
        raise AuditLogError(f"{f'{key}: ' if is_path else ''}{unusable}: {exc}") from exc


def kept_hashes(anchors: Sequence[tuple[int, str]]) -> dict[int, str]:
    """``(record id, record hash)`` heads kept from earlier checks, as id -> lower-case hash
    (the empty log's head, id 0, holds no record to check)."""
    return {int(rid): str(digest).lower() for rid, digest in anchors if int(rid) > 0}


def check_kept_heads(where: str, kept: dict[int, str], hash_of: Callable[[int], str | None]) -> None:
    """Each record whose hash was kept (``kept``: id -> hash) must still be there
    (``hash_of`` its id gives its hash, None when it is gone) and carry that hash."""
    for rid in sorted(kept):
        digest = hash_of(rid)
        if digest is None:
            raise chain_error(f"{where}: record {rid}, whose hash was kept, is gone; the newest "
                               "records were removed", rid)
        if digest != kept[rid]:
            raise chain_error(f"{where}: record {rid}: its hash is not the one kept for it "
                               f"({kept[rid][:12]}...); records up to it were rewritten and "
                               "re-hashed after that hash was kept", rid)


def log_file_kind(path: Path) -> str:
    """What ``path`` holds by its first bytes: "sqlite" (a log), "json" (an export), or ""
    (neither, or unreadable)."""
    try:
        with open(path, "rb") as f:
            start = f.read(64)
    except OSError:
        return ""
    if start.startswith(b"SQLite format 3\x00"):
        return "sqlite"
    return "json" if start.removeprefix(b"\xef\xbb\xbf").lstrip()[:1] == b"{" else ""  # a BOM an editor added


def is_export(path: Path) -> bool:
    """Whether ``path`` is a JSON export rather than a SQLite log (by its first bytes)."""
    return log_file_kind(path) == "json"


def _wrong_types(record: AuditRecord) -> str:
    """What in ``record`` is not of the type its column holds ("" when nothing is): a
    string score would compare as text, an id "3" would pass for 3."""
    for name in (f.name for f in dataclasses.fields(record)):
        value = getattr(record, name)
        want = int if name == "id" else float if name in ("score", "threshold") else str
        if isinstance(value, bool) or not isinstance(value, (int, float) if want is float else want):
            return f"its {name} is {type(value).__name__} {value!r}, not {want.__name__}"
    return ""


class ChainWalk:
    """The checks each record of a chain must pass, record after record, oldest first:
    its id and ``prev_hash`` follow the record before, its hash covers its fields, its
    photo (when there) matches its sha256, and it agrees with its own verdict. Used on a
    log (:meth:`~auditlens.device_app.auditlog.AuditLog.verify_chain`) and on a JSON export
    (:func:`verify_export`)."""

    def __init__(self, where: str, start_id: int = 0, start_hash: str = GENESIS_HASH,
                 first_utc: str = "", last_utc: str = "", *, log_id: str = "",
                 device_keys: dict[str, str] | None = None, signed_from: int = 1,
                 first_signed: int | None = None) -> None:
        self.where = where
        self.head_hash, self.count = start_hash, start_id
        self.first_utc, self.last_utc = first_utc, last_utc
        self.backwards: list[str] = []
        self.no_auditor: list[int] = []
        """Records that name no auditor (the command line lets one through, with a warning)."""
        self.matched_photos: dict[str, int] = {}
        """Each MATCH's photo sha256 -> the first record it passed."""
        self.rematched: list[tuple[int, int]] = []
        """(record, earlier record) pairs of MATCHes on one photo."""
        self.runs: list[dict] = []
        self.log_id = log_id
        """The log's id, which each signature covers."""
        self.device_keys = device_keys
        """hex -> fingerprint of the keys every record from ``signed_from`` on, and from the
        first signed one on, must be signed by; None: a signature is checked against the key
        it names."""
        self.signed_from = max(1, int(signed_from))
        self.first_signed = first_signed
        """Id of the first signed record so far (before ``start_id`` too)."""
        self.signed_by: list[dict] = []
        self.unsigned_after: list[int] = []
        """Unsigned records after a signed one (without device keys: a warning)."""
        self.unchecked = 0
        """Signatures not checked: the [sign] extra is not installed (no device keys given)."""
        self._keys: dict[str, object] = {}

    def _fail(self, rid: int, why: str) -> AuditChainError:
        return chain_error(f"{self.where}: record {rid}: {why}", rid)

    def add(self, record: AuditRecord, photo: bytes | None, *, photo_kept: bool = True) -> None:
        """Check ``record`` (and ``photo``, the stored bytes; ``photo_kept=False``: a copy
        without photos, nothing to compare) as the next record of the chain."""
        rid, expected = record.id, self.count + 1
        wrong = _wrong_types(record)
        if wrong:
            raise self._fail(expected, f"{wrong}; auditlens never writes such a record, so it "
                                       "was made or edited outside auditlens")
        if rid != expected:
            missing = f"record {expected}" if rid == expected + 1 else f"records {expected}..{rid - 1}"
            raise self._fail(rid, f"the chain is broken before it ({missing} removed); the log "
                                  "was edited outside auditlens")
        if record.prev_hash != self.head_hash:
            raise self._fail(rid, f"its prev_hash does not match record {rid - 1}; a record was "
                                  "edited, removed or reordered")
        try:
            recomputed = record_hash(record.hashed_fields())
        except (TypeError, ValueError) as exc:
            raise self._fail(rid, f"unreadable fields ({exc})") from exc
        if recomputed != record.record_hash:
            raise self._fail(rid, "its contents do not match its hash; the record was edited "
                                  "after it was written")
        if record.photo_mime not in PHOTO_MIMES:  # checked with or without the photo
            raise self._fail(rid, f"its photo type {record.photo_mime[:80]!r} is none auditlens writes; "
                                  "the record was edited after it was written")
        if photo_kept:
            if photo is None or hashlib.sha256(bytes(photo)).hexdigest() != record.photo_sha256:
                raise self._fail(rid, "the stored photo does not match the photo's sha256; the "
                                      "photo was replaced after it was written")
            if record.photo_mime in PHOTO_SUFFIX and sniffed_mime(bytes(photo)) != record.photo_mime:
                raise self._fail(rid, f"the photo is stored as {record.photo_mime} but its bytes "
                                      "are not; the record was edited after it was written")
        try:
            verdict = json.loads(record.verdict_json)
        except ValueError:
            verdict = None
        disagreement = _disagreement(record, verdict)
        if disagreement:
            raise self._fail(rid, f"{disagreement}; auditlens never writes such a record, so it "
                                  "was made or edited outside auditlens")
        self._check_signature(record)
        # a second look's verdict carries its own threshold; the run is the bundle's
        first_threshold = verdict.get("first_threshold")
        setting = {"model_id": record.model_id, "bundle_id": storable_text(verdict.get("bundle_id", "")),
                   "threshold": first_threshold if isinstance(first_threshold, float) else record.threshold}
        if self.runs and self.runs[-1]["last_id"] == rid - 1 and all(
                self.runs[-1][k] == v for k, v in setting.items()):
            self.runs[-1]["last_id"] = rid
        else:
            self.runs.append({"first_id": rid, "last_id": rid, **setting})
        if self.last_utc and record.created_utc < self.last_utc:
            self.backwards.append(f"record {rid} ({record.created_utc}) was written before "
                                  f"record {rid - 1} ({self.last_utc})")
        if not str(record.auditor or "").strip():
            self.no_auditor.append(rid)
        if record.decision == "match":
            first = self.matched_photos.setdefault(record.photo_sha256, rid)
            if first != rid:
                self.rematched.append((rid, first))
        self.head_hash, self.count = record.record_hash, rid
        self.first_utc = self.first_utc or record.created_utc
        self.last_utc = record.created_utc

    def _check_signature(self, record: AuditRecord) -> None:
        """The record's signature holds for the key it names, that key is one of the
        device keys (when given), and a record from ``signed_from`` on, or after a signed
        one, is signed."""
        from auditlens.device_app.signing import fingerprint_hex

        rid, signer = record.id, record.signer
        if signer or record.signature:
            if not _well_formed_signature(signer, record.signature):
                raise self._fail(rid, "its signature or the key it names is not well formed; "
                                      "auditlens never writes such a record, so it was edited "
                                      "outside auditlens")
            key = fingerprint_hex(signer)
            held_to_keys = self.device_keys is not None and (
                rid >= self.signed_from or self.first_signed is not None)
            if held_to_keys and signer not in self.device_keys:
                given = ", ".join(self.device_keys.values())
                hint = "" if self.first_signed else (
                    f" (no record before it is signed by them either: if {key} is this device's "
                    "key, the wrong public key was given)")
                raise self._fail(rid, f"it is signed by the key {key}, not by the device keys "
                                      f"given ({given}); it was written by another device or "
                                      f"outside auditlens{hint}")
            holds = self._signature_holds(record)
            if holds is False:
                raise self._fail(rid, f"its signature does not verify with the key it names ({key}); "
                                      "the record or its signature was changed after it was written")
            if self.device_keys is None or signer in self.device_keys:
                self.first_signed = self.first_signed or rid
        else:
            key = ""
            if self.device_keys is not None and self.first_signed is not None:
                raise self._fail(rid, f"it is not signed, though record {self.first_signed} "
                                      "before it is: it was written without the device's key, "
                                      "or its signature was removed, outside auditlens")
            if self.device_keys is not None and rid >= self.signed_from:
                raise self._fail(rid, f"it is not signed, and every record from {self.signed_from} "
                                      "on must be signed by the device keys given: it was written "
                                      "without the device's key, or its signature was removed (if "
                                      "your own records say the device got its key at a later "
                                      "record, pass that record's id as --signed-from ID)")
            if self.first_signed is not None:
                self.unsigned_after.append(rid)
        if self.signed_by and self.signed_by[-1]["key"] == key and self.signed_by[-1]["last_id"] == rid - 1:
            self.signed_by[-1]["last_id"] = rid
        else:
            self.signed_by.append({"first_id": rid, "last_id": rid, "key": key})

    def _signature_holds(self, record: AuditRecord) -> bool | None:
        """Whether the record's signature verifies with the key it names (None: not checked)."""
        holds = self.holds(signed_message(self.log_id, record.record_hash), record.signature,
                           record.signer)
        self.unchecked += holds is None
        return holds

    def holds(self, message: bytes, signature_hex: str, signer_hex: str) -> bool | None:
        """Whether ``signature_hex`` of ``message`` verifies with the key ``signer_hex``
        (both well formed); None when it cannot be checked here (no `cryptography`, and no
        device keys were asked for)."""
        from auditlens.device_app.signing import load_public_key, signature_holds

        if signer_hex not in self._keys:
            if self.device_keys is None and importlib.util.find_spec("cryptography") is None:
                return None
            try:
                self._keys[signer_hex] = load_public_key(signer_hex)
            except AuditlensError:  # 64 hex digits that are no point of the curve
                return False
        return signature_holds(message, bytes.fromhex(signature_hex), self._keys[signer_hex])

    def report(self, log_id: str, triggers_intact: bool, warnings: tuple[str, ...]) -> ChainReport:
        unsigned_start = min(self.count + 1, self.first_signed or self.signed_from)
        notes: tuple[str, ...] = ()
        if self.device_keys is not None and unsigned_start > 1:  # what --signed-from asked for
            notes += (f"{id_range(1, unsigned_start - 1)} not held to the device keys, as "
                         f"--signed-from {self.signed_from} allows: written before the device had "
                         "its key, or their signatures were removed or replaced; only the records "
                         "from the first one the device keys signed on are held to them",)
        if self.device_keys is not None and self.first_signed is None and self.signed_from > self.count:
            warnings += (f"no record is signed by the device keys: the log ends at record {self.count}, "
                         f"before record {self.signed_from} (--signed-from), so nothing here was held to "
                         "them; the signed records may have been cut off: check the log against a kept "
                         "head (--expect-head)",)
        if self.unsigned_after:
            warnings += (f"{len(self.unsigned_after)} record(s) are not signed though record "
                         f"{self.first_signed} before them is, first: record {self.unsigned_after[0]}; "
                         "the device stopped signing, or they were written outside auditlens "
                         "(check with --device-key)",)
        if self.unchecked:
            warnings += (f"{self.unchecked} record signature(s) were not checked: the [sign] "
                         "extra (cryptography) is not installed",)
        if self.rematched:
            rid, first = self.rematched[0]
            warnings += (f"{len(self.rematched)} MATCH record(s) judged a photo an earlier MATCH had "
                         f"judged, first: record {rid}, on record {first}'s photo; one photo passed "
                         "several verifications: check that each audit photographed its product",)
        if self.no_auditor:
            warnings += (f"{len(self.no_auditor)} record(s) name no auditor, first: record "
                         f"{self.no_auditor[0]}; who made those verifications is not on record",)
        if self.backwards:
            warnings += (
                f"the records' times go backwards {len(self.backwards)} time(s), first: "
                f"{self.backwards[0]}; the device's clock was set back, or records were written "
                "outside auditlens",)
        return ChainReport(self.where, self.count, self.head_hash, log_id, triggers_intact,
                           self.first_utc, self.last_utc, tuple(dict.fromkeys(warnings)),  # an export's
                           tuple(self.signed_by), self.device_keys is not None,  # header may
                           tuple(self.runs), notes=notes)  # already carry what the walk found


def verdict_contradiction(decision: str, score: float, threshold: float) -> str:
    """What is wrong with a verdict whose decision its own score and threshold refute
    ("" when nothing is)."""
    if (decision, score >= threshold) not in (("match", False), ("no_match", True)):
        return ""
    return (f"a {decision!r} verdict whose score {score} is "
            f"{'below' if decision == 'match' else 'at or above'} its threshold {threshold}")


def _disagreement(record: AuditRecord, verdict) -> str:
    """Why a record with this (parsed) verdict, hashed as it is, cannot have been written
    by :meth:`~auditlens.device_app.auditlog.AuditLog.append` ("" when it can): its columns
    differ from its own verdict, or the verdict's decision contradicts its score. A record made outside auditlens and
    hashed to fit the chain would pass the hash checks; this catches one made carelessly."""
    if not isinstance(verdict, dict):
        return "its verdict is not a JSON object"
    for name in VERDICT_COLUMNS:
        column, value = getattr(record, name), verdict.get(name, "" if name == "model_id" else None)
        try:
            # logs written before append stored the verdict's fields as the columns hold
            # them have a float32 score's short text in the JSON
            same = (math.isclose(float(value), column, rel_tol=1e-6, abs_tol=1e-9)
                    if isinstance(column, float) else storable_text(value) == column)
        except (TypeError, ValueError):
            same = False
        if not same:
            return f"its {name} ({column!r}) is not its verdict's ({value!r})"
    contradiction = verdict_contradiction(record.decision, record.score, record.threshold)
    return f"it holds {contradiction}" if contradiction else ""


def chain_error(message: str, record_id: int | None) -> AuditChainError:
    exc = AuditChainError(message)
    exc.record_id = record_id  # type: ignore[attr-defined]
    return exc


def id_range(first: int, last: int) -> str:
    """'record 3' or 'records 3-7', as reports name a run of records."""
    return f"record {first}" if first == last else f"records {first}-{last}"
