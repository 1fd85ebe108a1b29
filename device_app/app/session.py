"""What the field app does, without the UI: load the bundle, find products, verify a
capture and write it to the audit log, list and export the history.

No Kivy here (the screens call this from a worker thread), so it is tested directly and
reusable by another front end.
"""

from __future__ import annotations

import io
import os
import sqlite3
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from PIL import Image

from auditlens.device_app.auditlog import AuditLog, AuditRecord, ChainReport
from auditlens.device_app.bundle import ProductRecord, ReferenceBundle
from auditlens.device_app.verifier import Verdict, Verifier, VerifierOptions
from auditlens.errors import AuditlensError

PREVIEW_SIDE = 640
"""The capture is shown on the verdict screen at most this large."""


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
    locked, ...): the verdict is kept in :attr:`Session.unlogged` and written first
    the next time the log accepts a record."""


@dataclass
class Session:
    """An auditor's session on the device: a verified bundle, a verifier and a log."""

    bundle_path: Path
    log_path: Path
    auditor: str = ""
    device: str = ""
    public_key: str | bytes | None = None
    options: VerifierOptions = field(default_factory=VerifierOptions)
    verifier: Verifier | None = None
    log: AuditLog | None = None

    def __post_init__(self) -> None:
        self.bundle_path = Path(self.bundle_path)
        self.log_path = Path(self.log_path)
        self._lock = threading.Lock()
        self.unlogged: list[tuple[Verdict, bytes, str]] = []
        """Judged captures the log could not take yet (verdict, photo, auditor), oldest first."""

    # -- lifecycle -----------------------------------------------------------------
    def load(self) -> ReferenceBundle:
        """Verify and load the bundle (raises a BundleError the app shows as a refusal)
        and open the audit log."""
        self.verifier = Verifier(self.bundle_path, self.options, public_key=self.public_key)
        self.log = AuditLog(self.log_path, device=self.device)
        return self.verifier.bundle

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
            self.log = None

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

    def thumbnail(self, product_id: str) -> Image.Image:
        return self.bundle.thumbnail(product_id)

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
            self.unlogged.append((verdict, photo, self.auditor))
            try:
                outcome.record_id = self._write_unlogged()
            except (AuditlensError, OSError, sqlite3.Error) as exc:
                outcome.log_error = str(exc)
            outcome.log_seconds = time.perf_counter() - t0
        return outcome

    def _write_unlogged(self) -> int | None:
        """Append the held verdicts in capture order; returns the last record id.
        Stops at the first failure, keeping that verdict and the ones after it."""
        record_id = None
        while self.unlogged:
            verdict, photo, auditor = self.unlogged[0]
            record_id = self.log.append(verdict, photo=photo, auditor=auditor)
            self.unlogged.pop(0)
        return record_id

    # -- history ---------------------------------------------------------------------
    def history(self, limit: int = 200) -> list[AuditRecord]:
        assert self.log is not None
        return self.log.records(newest_first=True, limit=limit)

    def check_log(self) -> ChainReport:
        assert self.log is not None
        return self.log.verify_chain()

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
