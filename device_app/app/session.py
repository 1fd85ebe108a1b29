"""What the field app does, without the UI: load the bundle, find products, verify a
capture and write it to the audit log, list and export the history.

No Kivy here (the screens call this from a worker thread), so it is tested directly and
reusable by another front end.
"""

from __future__ import annotations

import io
import math
import os
import sqlite3
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from PIL import Image

from auditlens.device_app.auditchain import AuditRecord, ChainReport
from auditlens.device_app.auditlog import AuditLog
from auditlens.device_app.bundle import ProductRecord, ReferenceBundle
from auditlens.device_app.verifier import Verdict, Verifier, VerifierOptions
from auditlens.errors import AuditlensError, AuditLogError, AuditRecordError
from auditlens.files import atomic_write

_LOG_ERRORS = (AuditlensError, OSError, sqlite3.Error)
"""What writing to the log may raise: the verdict then waits."""

PREVIEW_SIDE = 640
"""The capture is shown on the verdict screen at most this large."""

REFUSED, UNREADABLE = ".refused", ".unreadable"
"""Suffixes of held verdicts set aside for a person: the log refused the record, or the
held file could not be read back."""


@dataclass
class Outcome:
    """The result of one capture: the verdict and where it was logged, or why none."""

    product_id: str
    verdict: Verdict | None = None
    record_id: int | None = None
    capture: Image.Image | None = None
    """A display-size copy of the capture."""
    error: str = ""
    """Set when the photo could not be judged at all (unreadable file...)."""
    seconds: float = 0.0
    """Time from capture to verdict (decode, quality check, inference, scoring)."""
    log_seconds: float = 0.0
    log_error: str = ""
    """Set when the verdict was judged but the log could not take it (disk full, file
    locked, ...): the verdict is held (see :meth:`Session.held`) and written first the
    next time the log accepts a record."""


@dataclass(frozen=True)
class HeldVerdict:
    """A verdict judged on this device that is not in the audit log: waiting for it (a
    file in :attr:`Session.held_dir`, or memory when that could not be written), or set
    aside for a person (the log refused it, or its file is damaged). It reads like an
    :class:`AuditRecord` where History lists it."""

    key: str
    """Its file's name in :attr:`Session.held_dir`, or ``memory:N`` (held in memory)."""
    state: str
    """``waiting`` (a file) or ``in memory``, written when the log works again; ``refused``
    (the log would not take it as a record) or ``unreadable`` (its file is damaged), set
    aside for a person."""
    held_ns: int
    """When it was held (ns since the epoch; 0 when its file's name does not say)."""
    verdict: dict
    """The verdict as it would be logged ({} when its file does not read)."""
    auditor: str = ""

    @property
    def set_aside(self) -> bool:
        """Whether no later capture writes it: a person must look at it."""
        return self.state in ("refused", "unreadable")

    def _field(self, name: str, kind: type | tuple[type, ...], default):
        """A verdict field of the type expected, else ``default`` (a damaged file still lists)."""
        value = self.verdict.get(name, default)
        return value if isinstance(value, kind) and not isinstance(value, bool) else default

    @property
    def product_id(self) -> str:
        return self._field("product_id", str, "?")

    @property
    def decision(self) -> str:
        return self._field("decision", str, "unknown")

    @property
    def score(self) -> float:
        return float(self._field("score", (int, float), float("nan")))

    @property
    def threshold(self) -> float:
        return float(self._field("threshold", (int, float), float("nan")))

    @property
    def reasons(self) -> tuple[str, ...]:
        return tuple(str(r) for r in self._field("reasons", list, []))

    @property
    def judged_utc(self) -> str:
        """When it was judged (the verdict's time; else the time it was held)."""
        stamp = self._field("judged_utc", str, "")
        if stamp or not self.held_ns:
            return stamp
        try:
            return datetime.fromtimestamp(self.held_ns / 1e9, timezone.utc).isoformat(timespec="seconds")
        except (OverflowError, OSError, ValueError):  # a name no device wrote
            return ""


@dataclass
class Session:
    """An auditor's session on the device: a verified bundle, a verifier and a log."""

    bundle_path: Path
    log_path: Path
    auditor: str = ""
    device: str = ""
    public_key: str | bytes | None = None
    log_key: str | bytes | os.PathLike | None = None
    """The device's private key: every record the session logs is signed with it."""
    options: VerifierOptions = field(default_factory=VerifierOptions)
    verifier: Verifier | None = None
    log: AuditLog | None = None

    def __post_init__(self) -> None:
        self.bundle_path = Path(self.bundle_path)
        self.log_path = Path(self.log_path)
        self._lock = threading.RLock()
        self._checked: tuple[int, str] | None = None  # the head of the last chain check
        self.auditor = self.auditor or self.saved_auditor()
        self._held_key = None
        """The device key (private, public hex) that signs held files, with ``log_key``: a
        file put in :attr:`held_dir` by anyone else is set aside, never signed into the log."""
        self._log_id: str | None = None
        self._refused_in_memory: set[int] = set()
        """Held times of :attr:`unlogged` verdicts the log refused as records (kept, skipped)."""
        self.unlogged: list[tuple[int, Verdict, bytes, str]] = []
        """Judged captures the log could not take and that could not be written to
        :attr:`held_dir` either (time held in ns, verdict, photo, auditor), oldest first:
        lost if the app closes before the log takes them."""

    @property
    def auditor_file(self) -> Path:
        """The name the auditor last typed, beside the log: the next start fills it in."""
        return self.log_path.with_name(f".{self.log_path.name}.auditor")

    def saved_auditor(self) -> str:
        """The name :meth:`remember_auditor` kept, or "" (none yet, or unreadable)."""
        try:
            return self.auditor_file.read_text(encoding="utf-8").strip()[:200]
        except (OSError, UnicodeDecodeError):
            return ""

    def remember_auditor(self, name: str) -> None:
        """Use ``name`` for the records from now on and keep it for the next start (a
        failure to keep it costs only the retyping, so it is not an error)."""
        self.auditor = name.strip()
        if self.auditor == self.saved_auditor():
            return
        try:
            if not self.auditor:  # cleared: the next start must ask again
                self.auditor_file.unlink(missing_ok=True)
                return
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(self.auditor_file) as fh:
                fh.write(self.auditor + "\n")
        except OSError:
            pass

    @property
    def held_dir(self) -> Path:
        """Where verdicts the log could not take wait, one JSON file each (verdict, photo,
        auditor), beside the log: they survive the app being closed or killed."""
        return self.log_path.with_name(f".{self.log_path.name}.held")

    # -- lifecycle -----------------------------------------------------------------
    def load(self) -> ReferenceBundle:
        """Verify and load the bundle (raises a BundleError the app shows as a refusal)
        and open the audit log (raises an AuditLogError, an AuditChainError for a log
        edited outside auditlens: the bundle is not at fault)."""
        self.verifier = Verifier(self.bundle_path, self.options, public_key=self.public_key)
        try:
            self.log = AuditLog(self.log_path, device=self.device, signing_key=self.log_key)
        except OSError as exc:  # e.g. its folder cannot be made
            raise AuditLogError(f"{self.log_path}: cannot open the audit log: {exc}") from exc
        try:
            self.log.check_can_append()  # a signed log, and the app started without its key
        except AuditLogError:
            self.log.close()
            self.log = None
            raise
        self._held_signer()  # the key and the log's id read once, now: a verdict is held
        self._held_log_id()  # when the log, or the key's file, cannot be read
        self.write_held()  # verdicts held when the app last ran
        return self.verifier.bundle

    def close(self) -> None:
        with self._lock:  # not while a worker job is writing to the log
            if self.log is not None:
                self.write_held()
                self.log.close()
                self.log = None

    def summary(self) -> str:
        """One line on what the session judges with, for the product picker's header: the
        bundle, its threshold and whether it is calibrated and signed, whether records are
        signed, and a warning when opening the log found its guards removed."""
        bundle = self.bundle
        far = bundle.target_far
        calibrated = f", calibrated for {far:.1%} false accepts" if far is not None else ", NOT calibrated"
        signature = {"checked": "signature checked", "unchecked": "signature NOT checked",
                     "unsigned": "not signed"}[bundle.signature]
        signer = self.log.signer if self.log is not None else ""
        records = f" - records signed by {signer}" if signer else " - records not signed"
        line = (f"{len(bundle.products)} products - model {bundle.model_id[:8]} - "
                f"threshold {bundle.threshold:.3f}{calibrated} - {signature}{records}")
        if self.log is not None and self.log.guards_restored:
            line += (" - WARNING: the audit log's append-only guards had been removed outside "
                     "the app and were put back: have the log checked (auditlens verify-log)")
        return line

    def needs_attention(self) -> bool:
        """Whether :meth:`summary` carries a warning the picker must show as one: a bundle
        whose signature was not checked or that is not calibrated, or a log whose guards
        were removed."""
        bundle = self.bundle
        return (bundle.signature != "checked" or bundle.target_far is None
                or bool(self.log is not None and self.log.guards_restored))

    @property
    def bundle(self) -> ReferenceBundle:
        assert self.verifier is not None, "Session.load() first"
        return self.verifier.bundle

    # -- products --------------------------------------------------------------------
    def search(self, query: str, limit: int = 60) -> tuple[list[ProductRecord], int]:
        """Products whose id, name, group or code contains ``query`` (case-insensitive),
        best matches first; returns (first ``limit`` matches, total matches)."""
        q = query.strip().lower()
        hits: list[tuple[int, str, ProductRecord]] = []
        for p in self.bundle.products:
            pid, name = p.product_id.lower(), p.name.lower()
            if not q:
                rank = 3
            elif q in (pid, p.code.lower(), name):
                rank = 0
            elif pid.startswith(q) or name.startswith(q):
                rank = 1
            elif q in pid or q in name or q in p.group.lower() or (p.code and q in p.code.lower()):
                rank = 2
            else:
                continue
            hits.append((rank, name, p))
        hits.sort(key=lambda t: (t[0], t[1]))
        return [p for _, _, p in hits[:limit]], len(hits)

    def product_for_code(self, code: str) -> ProductRecord | None:
        """The product a scanned barcode/QR code belongs to (codes the bundle carries),
        falling back to a code that is itself a product id."""
        code = code.strip()
        record = self.bundle.product_for_code(code)
        if record is None:
            try:
                record = self.bundle.product(code)
            except AuditlensError:
                record = None
        return record

    def thumbnail(self, product_id: str) -> Image.Image | None:
        """The product's thumbnail, or None when it cannot be shown (a missing picture
        must never cost a verdict or its screen)."""
        try:
            return self.bundle.thumbnail(product_id)
        except Exception:  # noqa: BLE001 - display only: any decoding failure
            return None

    # -- the verb --------------------------------------------------------------------
    def verify(self, photo: bytes, product_id: str) -> Outcome:
        """Verify a captured photo (encoded bytes) and append the verdict to the log.
        Every judged capture is logged, RETAKE included; a photo that cannot be decoded
        at all gives an Outcome with ``error`` and no record."""
        import time

        assert self.verifier is not None and self.log is not None, "Session.load() first"
        started = time.perf_counter()
        outcome = Outcome(product_id)
        with self._lock:  # one interpreter: one verification at a time
            try:
                capture = self.verifier.prepare(photo)
                verdict = self.verifier.verify(capture, product_id)
            except AuditlensError as exc:
                outcome.error = str(exc)
                outcome.seconds = time.perf_counter() - started
                return outcome
            outcome.seconds = time.perf_counter() - started
            preview = capture.image.copy()
            preview.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE), Image.Resampling.BILINEAR)
            outcome.capture, outcome.verdict = preview, verdict
            t0 = time.perf_counter()
            try:
                self._write_held()  # older verdicts first, in capture order
                outcome.record_id = self.log.append(verdict, photo=photo, auditor=self.auditor)
            except _LOG_ERRORS as exc:
                outcome.log_error = str(exc) + self._hold(verdict, photo, self.auditor)
            outcome.log_seconds = time.perf_counter() - t0
        return outcome

    # -- verdicts the log could not take -------------------------------------------------
    def held(self) -> int:
        """How many judged verdicts wait for the log."""
        files = list(self.held_dir.glob("*.json")) if self.held_dir.is_dir() else []
        return len(files) + len(self.unlogged)

    def set_aside(self) -> int:
        """How many held verdicts were set aside for a person (``*.refused``: the log would
        not take them as records; ``*.unreadable``: their held file is damaged): they are in
        no log and no export, and no later capture writes them."""
        if not self.held_dir.is_dir():
            return 0
        return sum(1 for p in self.held_dir.iterdir() if p.suffix in (REFUSED, UNREADABLE))

    def write_held(self) -> str:
        """Try to write the held verdicts now (the app calls this on start, on History and
        when it stops); returns "" or why they still wait."""
        with self._lock:
            if self.log is None:
                return "the audit log is not open"
            try:
                self._write_held()
                return ""
            except _LOG_ERRORS as exc:
                return str(exc)

    def held_verdicts(self) -> list[HeldVerdict]:
        """The verdicts not in the log, newest first: those waiting and those set aside,
        for History to list beside the records."""
        with self._lock:
            items = [self._in_memory(entry) for entry in self.unlogged]
            files = self.held_dir.iterdir() if self.held_dir.is_dir() else ()
            items += [_held_file(path)[0] for path in files if path.suffix in _HELD_STATES]
        items.sort(key=lambda h: (h.held_ns, h.key), reverse=True)
        return items

    def held_detail(self, key: str) -> tuple[HeldVerdict, Image.Image | None]:
        """One held verdict (a :meth:`held_verdicts` key) and its photo, for History's
        record view (the photo None when it does not decode). Raises AuditlensError when
        it is held no longer: the log took it meanwhile (it is a record now)."""
        with self._lock:
            for entry in self.unlogged:
                if key == f"memory:{entry[0]}":
                    return self._in_memory(entry), _screen_image(entry[2])
            name = Path(key).name
            stem = name.rsplit(".", 1)[0]
            # listed as waiting, and set aside since (History was not refreshed): the same verdict
            for path in [self.held_dir / name] + [self.held_dir / f"{stem}{s}" for s in _HELD_STATES]:
                if path.suffix in _HELD_STATES and path.is_file():
                    held, photo = _held_file(path, photo=True)
                    return held, _screen_image(photo)
            raise AuditlensError(f"{key}: no longer held (the audit log took it: it is in History)")

    def _in_memory(self, entry) -> HeldVerdict:
        """A verdict held in memory (an :attr:`unlogged` entry) as History lists it."""
        ns, verdict, _photo, auditor = entry
        state = "refused" if ns in self._refused_in_memory else "in memory"
        return HeldVerdict(f"memory:{ns}", state, ns, verdict.to_dict(), auditor)

    def _hold(self, verdict: Verdict, photo: bytes, auditor: str) -> str:
        """Keep a verdict for later in :attr:`held_dir`; returns a note for the auditor."""
        import base64
        import json
        import time

        from auditlens.files import atomic_write

        held_ns = time.time_ns()
        try:
            self.held_dir.mkdir(exist_ok=True)
            name = f"{held_ns:020d}-{verdict.photo_sha256[:12]}.json"
            held = {"verdict": verdict.to_dict(), "auditor": auditor,
                    "photo": base64.b64encode(photo).decode("ascii")}
            if self._held_signer() is not None:
                message = _held_message(held["verdict"], auditor, photo, self._held_log_id(), held_ns)
                held["signature"] = self._held_signer()[0].sign(message).hex()
            with atomic_write(self.held_dir / name) as f:
                json.dump(held, f)
            return ""
        except Exception as exc:  # noqa: BLE001 - full disk or worse: keep it in memory
            self.unlogged.append((held_ns, verdict, photo, auditor))
            return (f" (and it could not be saved for later either: {exc}; it is kept in "
                    "memory and lost if the app closes before the log works again)")

    def _write_held(self) -> None:
        """Append the held verdicts (files and memory together), oldest first; a log
        failure stops there, keeping that verdict and the ones after it. A verdict already
        in the log (the app was killed between writing it and removing its file) is not
        written twice. A held file that cannot be read is renamed ``*.unreadable``, and one
        the log refuses as a record (:class:`AuditRecordError`: its photo is not the one
        judged, a field is missing) ``*.refused``, as is one the device's key did not sign
        for this log at the time its name gives, when the session signs its records (an
        unsigned one, held before the device had its key, joins the log unsigned while no
        record of it is signed): all stay on disk for a person to look at and are skipped,
        so they cannot block the ones after them; a refused verdict held in memory stays
        there and is skipped the same way."""
        import base64
        import json

        files = sorted(self.held_dir.glob("*.json")) if self.held_dir.is_dir() else []
        queue = [(_held_at(p), p) for p in files] + [(entry[0], entry) for entry in self.unlogged]
        for _, item in sorted(queue, key=lambda t: t[0]):
            if isinstance(item, Path):
                try:
                    held = json.loads(item.read_text(encoding="utf-8"))
                    verdict, auditor = held["verdict"], held["auditor"]
                    photo = base64.b64decode(held["photo"], validate=True)
                except (OSError, ValueError, KeyError, TypeError):
                    item.replace(item.with_suffix(UNREADABLE))
                    continue
                signed = self._signed_by_this_device(held, photo, _held_at(item))
                if signed is False:
                    item.replace(item.with_suffix(REFUSED))
                    continue
                try:
                    if not self.log.holds(verdict, photo):
                        self.log.append(verdict, photo=photo, auditor=auditor, sign=signed is not None)
                except AuditRecordError:
                    item.replace(item.with_suffix(REFUSED))
                    continue
                item.unlink()
            else:
                _, verdict, photo, auditor = item
                try:
                    self.log.append(verdict, photo=photo, auditor=auditor)
                except AuditRecordError:
                    self._refused_in_memory.add(item[0])
                    continue
                self.unlogged.remove(item)

    def _held_signer(self):
        """The device key (private, public hex) held files are signed with; None without
        ``log_key``."""
        if self.log_key is not None and self._held_key is None:
            from auditlens.device_app.auditchain import load_signing_key

            self._held_key = load_signing_key(self.log_key)
        return self._held_key

    def _held_log_id(self) -> str:
        """The id of the log held verdicts wait for, read when the log opened (a verdict is
        held when the log cannot be read)."""
        if self._log_id is None and self.log is not None:
            self._log_id = self.log.log_id
        return self._log_id or ""

    def _signed_by_this_device(self, held: dict, photo: bytes, held_ns: int) -> bool | None:
        """Whether a held file may join the log signed (True), unsigned (None: the session
        has no key, or the file was held before the device had one and no record of the log
        is signed yet), or not at all (False: with a key, only a file that key signed for
        this log at the time its name gives is signed into it)."""
        if self._held_signer() is None:
            return None
        signature = held.get("signature")
        if signature is None and not self.log.has_signed_records:
            return None
        from auditlens.device_app.signing import signature_holds

        try:
            return isinstance(signature, str) and signature_holds(
                _held_message(held["verdict"], held["auditor"], photo, self._held_log_id(), held_ns),
                bytes.fromhex(signature), self._held_signer()[0].public_key())
        except (ValueError, TypeError):
            return False

    # -- history ---------------------------------------------------------------------
    def record_detail(self, record_id: int) -> tuple[AuditRecord, Image.Image | None]:
        """One record and its stored photo, for History's record view (the photo None when
        its bytes do not decode: a record of a capture that could not be judged)."""
        assert self.log is not None
        with self._lock:
            record, photo = self.log.record(record_id), self.log.photo(record_id)
        return record, _screen_image(photo)

    def history(self, limit: int = 200) -> list[AuditRecord]:
        """The newest ``limit`` records of the log (verdicts still held are not among
        them: :meth:`write_held` first, :meth:`held` counts what still waits)."""
        assert self.log is not None
        return self.log.records(newest_first=True, limit=limit)

    def check_log(self) -> ChainReport:
        """The log's chain: checked in full the first time, then only the records added
        since (History would otherwise re-hash every stored photo on each visit)."""
        assert self.log is not None
        report = self.log.verify_chain(since=self._checked, **self._own_key_check())
        self._checked = (report.records, report.head_hash)
        return report

    def _own_key_check(self) -> dict:
        """With a device key: every record from the first one this key signed on must be
        signed by it (a record signed with another key, or unsigned, turns History red)."""
        signer = self._held_signer()
        first = self.log.first_signed_by(signer[1]) if signer is not None else None
        return {} if first is None else {"device_keys": [signer[1]], "signed_from": first}

    def export(self, kind: str, folder: str | os.PathLike | None = None) -> Path:
        """Write the log as ``kind`` ('csv' or 'json') into ``folder`` (default: beside
        the log), named with the UTC time; returns the path."""
        assert self.log is not None
        folder = Path(folder) if folder else self.log_path.parent
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        path = folder / f"{self.log_path.stem}-{stamp}.{kind}"
        if kind == "csv":
            return self.log.export_csv(path)
        if kind == "json":
            return self.log.export_json(path)
        raise ValueError(f"unknown export kind {kind!r}")


def encode_jpeg(image: Image.Image, quality: int = 92) -> bytes:
    out = io.BytesIO()
    image.convert("RGB").save(out, "JPEG", quality=quality)
    return out.getvalue()


def _held_at(path: Path) -> int:
    """When a held file's verdict was held, in ns: its name's leading number, 20 digits as
    the device writes it (0 for any other name)."""
    stamp = path.name.split("-", 1)[0]
    return int(stamp) if stamp.isdigit() and len(stamp) == 20 else 0


_HELD_STATES = {".json": "waiting", REFUSED: "refused", UNREADABLE: "unreadable"}
"""A held file's state by its suffix."""


def _held_file(path: Path, photo: bool = False) -> tuple[HeldVerdict, bytes | None]:
    """A held file as History lists it, and with ``photo`` its photo's bytes (None when they
    do not read: a damaged file is still listed, with what of it reads)."""
    import base64
    import json

    try:
        held = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        held = {}
    held = held if isinstance(held, dict) else {}
    verdict = held.get("verdict") if isinstance(held.get("verdict"), dict) else {}
    auditor = held.get("auditor") if isinstance(held.get("auditor"), str) else ""
    entry = HeldVerdict(path.name, _HELD_STATES[path.suffix], _held_at(path), verdict, auditor)
    if not photo:
        return entry, None
    try:
        return entry, base64.b64decode(held.get("photo", ""), validate=True) or None
    except (ValueError, TypeError):
        return entry, None


def _screen_image(photo: bytes | None) -> Image.Image | None:
    """A stored photo decoded to a screen's worth of pixels; None when it does not decode."""
    if not photo:
        return None
    try:
        image = Image.open(io.BytesIO(photo))
        image.draft("RGB", (640, 640))  # a screen's worth, not the stored 1600 px
        return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def _held_message(verdict: dict, auditor: str, photo: bytes, log_id: str, held_ns: int) -> bytes:
    """What the device key signs of a held verdict: the verdict, the auditor, the photo's
    sha256, the log it waits for and the time it was held (its file name's), as ASCII JSON
    with sorted keys: a held file copied into another log's folder, or kept to be dropped
    back later, is not signed in."""
    import hashlib
    import json

    body = {"verdict": verdict, "auditor": auditor, "photo_sha256": hashlib.sha256(photo).hexdigest(),
            "log_id": log_id, "held_ns": int(held_ns)}
    return b"auditlens held verdict " + json.dumps(body, sort_keys=True, separators=(",", ":")).encode("ascii")


NO_MATCH_ADVICE = ("Check that the product you picked is the one in front of you. If it is, "
                   "retake once, closer and straight on; if it is still NO MATCH, report the product.")
"""What the auditor does after a NO MATCH (a genuine product is sometimes refused)."""


def history_judgement(record) -> str:
    """What a History row says of the judgement: the score against the threshold, or for a
    RETAKE (not judged) its first reason: its score would read like a pass or a fail."""
    if record.decision == "retake":
        reasons = record.reasons
        reason = reasons[0].split(":")[0] if reasons else "the photo could not be judged"
        return f"not judged: {reason}"
    if not (math.isfinite(record.score) and math.isfinite(record.threshold)):
        return "its verdict does not read"  # a damaged held file (HeldVerdict: NaN for no score)
    return f"score {record.score:.3f}/{record.threshold:.3f}"
