"""The field app's lifecycle: ``auditlens app --bundle BUNDLE [--camera-dir DIR]``.

The auditor picks a product, frames it, captures; the worker thread verifies the photo
with the engine and appends the verdict to the audit log; the verdict screen shows
MATCH / NO MATCH / RETAKE. Kivy is imported only when the app runs, so this module's
``add_arguments`` works for ``auditlens app --help`` on a machine without Kivy.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

from auditlens.device_app.auditlog import default_auditor
from auditlens.errors import AuditLogError

ANALYSE_EVERY_S = 0.8
"""How often a camera frame is analysed (quality hint, barcode) on the worker thread."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", "-b", type=Path, required=True,
                   help="the reference bundle (folder or .zip). Required, unlike the other commands' "
                        "default of the sample, so that audits are never logged against the demo "
                        "catalogue by mistake; to try the app: --bundle models/sample_bundle "
                        "--camera-dir models/sample/photos")
    p.add_argument("--camera-dir", type=Path, default=None, metavar="DIR",
                   help="play the image files in DIR as the camera (demos, tests) instead of a webcam")
    p.add_argument("--camera-index", type=int, default=0, help="which webcam to open (default: %(default)s)")
    p.add_argument("--camera-rotation", default="auto", choices=("auto", "0", "90", "180", "270"),
                   help="degrees clockwise that turn the camera's frames upright; auto: asked from "
                        "Android for a back camera, else 0 (default: %(default)s)")
    p.add_argument("--log", type=Path, default=None, metavar="AUDIT.db",
                   help="audit log (SQLite); default: audit.db in the app's data folder")
    p.add_argument("--auditor", default=default_auditor(),
                   help="auditor name written to the log (default: $USER, else the login name; here %(default)r)")
    p.add_argument("--device", default=socket.gethostname(), help="device name written to the log (default: the host name, %(default)s)")
    p.add_argument("--public-key", type=Path, default=None, metavar="KEY",
                   help="publisher's Ed25519 public key file: refuse bundles not signed with it")
    p.add_argument("--log-key", type=Path, default=None, metavar="KEY",
                   help="this device's private key (device.key of `auditlens keygen --device`): "
                        "every audit record is signed with it (needs the [sign] extra)")
    p.add_argument("--export-dir", type=Path, default=None,
                   help="where History exports CSV/JSON (default: beside the log)")
    p.add_argument("--size", default=None, metavar="WxH",
                   help="window size on a desktop, e.g. 720x1280 (phone) or 1280x800 (tablet)")


def configure_kivy(size: str | None = None) -> None:
    """Settings that must be made before Kivy's window exists."""
    os.environ.setdefault("KIVY_NO_ARGS", "1")  # our arguments are not Kivy's
    from kivy.config import Config

    Config.set("kivy", "exit_on_escape", "0")
    Config.set("input", "mouse", "mouse,multitouch_on_demand")
    if size:
        w, h = (int(v) for v in size.lower().split("x"))
        Config.set("graphics", "width", str(w))
        Config.set("graphics", "height", str(h))


def build_app_class():
    """The Kivy App class (built on demand so importing this module needs no Kivy)."""
    from kivy.app import App
    from kivy.clock import Clock
    from kivy.core.window import Window
    from kivy.uix.screenmanager import NoTransition, ScreenManager

    from auditlens.device_app.app.camera import (
        CameraUnavailable,
        FileCamera,
        KivyCamera,
        request_camera_permission,
        scan_codes,
        scanner_available,
    )
    from auditlens.device_app.app.screens import (
        CameraScreen,
        HistoryScreen,
        LoadingScreen,
        PickerScreen,
        RecordScreen,
        RefusalScreen,
        VerdictScreen,
    )
    from auditlens.device_app.app.session import Session
    from auditlens.device_app.app.widgets import BG
    from auditlens.device_app.app.worker import Worker
    from auditlens.device_app.quality import assess
    from auditlens.errors import AuditChainError, AuditlensError

    class AuditApp(App):
        """The field app. Its methods are what the buttons call (and what tests drive)."""

        title = "auditlens"

        def __init__(self, *, bundle: Path, camera_dir: Path | None = None, log: Path | None = None,
                     auditor: str = "", device: str = "", public_key: Path | bytes | None = None,
                     log_key: Path | bytes | None = None,
                     export_dir: Path | None = None, camera_index: int = 0,
                     camera_rotation: int | str = "auto", **kw):
            super().__init__(**kw)
            log = Path(log) if log else Path(self.user_data_dir) / "audit.db"
            self.session = Session(Path(bundle), log, auditor=auditor, device=device,
                                   public_key=public_key, log_key=log_key)
            self.camera_dir, self.camera_index = camera_dir, camera_index
            self.camera_rotation = camera_rotation
            self.export_dir = export_dir
            self.camera = None
            self.product_id: str | None = None
            self.scanning = False
            self.loaded = False
            self.load_error: BaseException | None = None
            self.last_outcome = None
            self.last_export = None
            self.worker: Worker | None = None
            self._analysing = False
            self._verifying = False
            self._notice_until = 0.0
            self._moves = 0  # counts the auditor's moves between screens (see show_history)

        # -- lifecycle ---------------------------------------------------------------
        def build(self):
            Window.clearcolor = BG
            Window.bind(on_keyboard=self.on_back_key)
            self.worker = Worker()
            self.sm = ScreenManager(transition=NoTransition())
            self.screens = {
                s.name: s for s in (LoadingScreen(), RefusalScreen(), PickerScreen(),
                                    CameraScreen(), VerdictScreen(), HistoryScreen(), RecordScreen())
            }
            for s in self.screens.values():
                self.sm.add_widget(s)
            self.sm.current = "loading"
            return self.sm

        def on_start(self):
            self.worker.submit(self.session.load, self._loaded, self._refused)
            Clock.schedule_interval(self._analyse_tick, ANALYSE_EVERY_S)
            if self.camera_dir is None:  # Android asks the user once; the answer comes later
                request_camera_permission(
                    lambda granted: Clock.schedule_once(lambda _dt: self._camera_permission(granted)))

        def _camera_permission(self, granted: bool) -> None:
            """The user answered Android's camera question: if the camera screen is up
            without a camera, try again now that it may open."""
            if granted and self.camera is None and self.sm.current == "camera" and not self.scanning:
                self.go_camera()

        def on_pause(self):
            # Android may stop a paused app without on_stop: write held verdicts now
            if self.loaded and self.worker is not None:
                self.worker.submit(self.session.write_held, lambda _r: None, lambda _e: None)
            return True

        def on_stop(self):
            if self.camera is not None:
                self.camera.stop()
            if self.worker is not None:
                self.worker.stop()
            self.session.close()

        @property
        def busy(self) -> bool:
            return self.worker is not None and not self.worker.idle

        def _loaded(self, _bundle):
            self.loaded = True
            self.screens["picker"].setup(self.session, scanner_available())
            self.sm.current = "picker"

        def _refused(self, exc: BaseException):
            self.load_error = exc
            message = str(exc) if isinstance(exc, AuditlensError) else f"{type(exc).__name__}: {exc}"
            if isinstance(exc, AuditLogError):  # the bundle loaded; the log did not open
                self.screens["refusal"].show_log(type(exc).__name__, message, str(self.session.log_path))
            else:
                self.screens["refusal"].show(type(exc).__name__, message, str(self.session.bundle_path))
            self.sm.current = "refusal"

        # -- navigation ----------------------------------------------------------------
        def _show(self, screen: str) -> None:
            """Switch to ``screen``: one move of the auditor's (what show_history counts)."""
            self._moves += 1
            self.sm.current = screen

        def on_back_key(self, _window, key, *_args) -> bool:
            """Android's Back key (Escape on a desktop): from the camera, a verdict or History
            back to the product picker, from a record back to History; on the picker it does nothing (the app is not closed by
            a stray press). Ignored while a verdict is on its way."""
            if key != 27 or not self.loaded:  # loading or refused: Back closes the app
                return False
            if self.sm.current == "record":
                self.show_history()
            elif self.sm.current in ("camera", "verdict", "history"):
                self.go_picker()
            return True

        def set_auditor(self, name: str, *, remember: bool = False) -> None:
            if remember:  # typing done (the box lost focus): kept for the next start
                self.session.remember_auditor(name)
            else:
                self.session.auditor = name.strip()

        def go_picker(self):
            if self._verifying:  # the verdict on its way must be seen before anything else
                return
            self.scanning = False
            if self.camera is not None:
                self.camera.stop()
            self._show("picker")

        def _ensure_camera(self) -> bool:
            screen = self.screens["camera"]
            if self.camera is not None:
                self.camera.start()
                return True
            try:
                self.camera = (FileCamera(self.camera_dir) if self.camera_dir
                               else KivyCamera(self.camera_index, rotation=self.camera_rotation))
                screen.attach_preview(self.camera.preview_widget())
            except CameraUnavailable as exc:
                self.camera = None
                screen.show_unavailable(str(exc))
                return False
            screen.show_files(self.camera)
            return True

        def select_product(self, product_id: str):
            if self._verifying:
                return
            record = self.session.bundle.product(product_id)
            self.product_id, self.scanning = record.product_id, False
            screen = self.screens["camera"]
            spec = self.session.bundle.spec
            screen.guide.look_at(spec.photo_zooms[0], spec.crop)
            ok = self._ensure_camera()
            screen.show_product(record, self.session.thumbnail(record.product_id))
            if not ok:
                screen.capture.disabled = True
                screen.hint.text = ""
            self._show("camera")

        def go_camera(self):
            if self.product_id is None:
                return self.go_picker()
            return self.select_product(self.product_id)

        def start_scan(self):
            if not scanner_available():
                return
            self.scanning = True
            self._ensure_camera()
            self.screens["camera"].show_product(None, None, scanning=True)
            self._show("camera")

        def step_camera(self, delta: int):
            if isinstance(self.camera, FileCamera):
                self.camera.step(delta)
                self.screens["camera"].show_files(self.camera)

        # -- live analysis of camera frames (off the UI thread) -------------------------
        def _analyse_tick(self, _dt):
            if (self.sm.current != "camera" or self.camera is None or self._analysing
                    or not self.worker.idle):
                return
            camera, scanning = self.camera, self.scanning
            grab_here = not isinstance(camera, FileCamera)  # GL textures: read on this thread
            frame = camera.frame(max_side=512) if grab_here else None
            if grab_here and frame is None:
                return
            self._analysing = True

            def job():
                image = frame if frame is not None else camera.frame(max_side=512)
                if image is None:
                    return None, []
                return assess(image), (scan_codes(image) if scanning else [])

            self.worker.submit(job, self._analysed, lambda _e: setattr(self, "_analysing", False))

        def _analysed(self, result):
            self._analysing = False
            quality, codes = result
            screen = self.screens["camera"]
            if self.sm.current != "camera":
                return
            if self.scanning:
                for code in codes:
                    record = self.session.product_for_code(code)
                    if record is not None:
                        self.select_product(record.product_id)
                        screen.hint.text = f"Scanned {code}: {record.name}"
                        self._notice_until = Clock.get_time() + 4.0
                        return
                screen.hint.text = (f"Code {codes[0]} is not in this bundle" if codes
                                    else "Looking for a barcode or QR code...")
                return
            if quality is None or screen.capture.text != "CAPTURE":
                return
            if Clock.get_time() < self._notice_until:  # let a notice (scanned code) be read
                return
            screen.hint.text = (f"Check: {quality.issues[0]}" if quality.issues
                                else "Fill the framing guide with the product")

        # -- capture and verdict ---------------------------------------------------------
        def capture(self):
            if self.product_id is None or self.camera is None or self.sm.current != "camera":
                return False
            if self._verifying:
                return False
            if not self.session.auditor:  # every record names who took it
                self.screens["camera"].hint.text = "Enter your name on the product screen first"
                self._notice_until = Clock.get_time() + 8.0
                return False
            try:
                photo = self.camera.capture()
            except (OSError, CameraUnavailable) as exc:
                self.screens["camera"].hint.text = f"Capture failed: {exc}"
                self._notice_until = Clock.get_time() + 8.0
                return False
            product_id = self.product_id
            self._verifying = True
            self._moves += 1
            self.screens["camera"].busy(True)

            def job():
                outcome = self.session.verify(photo, product_id)
                suggestions = outcome.verdict.suggestions if outcome.verdict is not None else ()
                thumbs = {c.product_id: self.session.thumbnail(c.product_id) for c in suggestions}
                return outcome, self.session.thumbnail(product_id), thumbs

            self.worker.submit(job, self._verified, self._capture_failed)
            return True

        def _verified(self, result):
            outcome, original, thumbs = result
            self._verifying = False
            self.last_outcome = outcome
            self.product_id = outcome.product_id  # Retake: this verdict's product
            self.screens["camera"].busy(False)
            record = self.session.bundle.product(outcome.product_id)
            self.screens["verdict"].show(outcome, record, original, thumbs)
            if self.camera is not None:
                self.camera.stop()
            self._show("verdict")

        def _capture_failed(self, exc: BaseException):
            self._verifying = False
            self.screens["camera"].busy(False)
            self.screens["camera"].hint.text = f"Not verified: {exc}"
            self._notice_until = Clock.get_time() + 8.0  # the frame check must not wipe it at once

        # -- history -----------------------------------------------------------------------
        def show_history(self):
            if self._verifying:
                return
            if self.camera is not None:
                self.camera.stop()
            asked = self._moves  # History opens only if the auditor has not moved on meanwhile

            def job():
                why_held = self.session.write_held()  # verdicts the log could not take yet
                try:
                    held = (self.session.held_verdicts(), why_held)
                except OSError as exc:  # the held folder cannot be listed: say so, show the log
                    note = f"the verdicts held on this device cannot be listed: {exc}"
                    held = ((), f"{why_held}; {note}" if why_held else note)
                try:
                    records = self.session.history()
                except Exception as exc:  # noqa: BLE001 - the screen says why, the held list still shows
                    return [], None, f"History could not be read: {exc}", held
                try:
                    return records, self.session.check_log(), "", held
                except AuditChainError as exc:  # the chain itself is broken
                    return records, None, f"AUDIT LOG TAMPERED: {exc}", held
                except AuditlensError as exc:  # cannot read it: not evidence of tampering
                    return records, None, f"Audit log could not be checked: {exc}", held

            self.worker.submit(job, lambda result: self._history_ready(result, asked),
                               lambda exc: self._history_failed(exc, asked))

        def show_record(self, record_id: int) -> None:
            """History's record view: the record and its stored photo, read on the worker."""
            def job():
                record, photo = self.session.record_detail(record_id)
                original = self.session.thumbnail(record.product_id)  # unknown products raise here
                return record, photo, original, self.session.bundle.product(record.product_id).name

            self._open_record(job, self.screens["record"].show, f"Record {record_id}")

        def show_held(self, key: str) -> None:
            """History's view of a verdict not in the log: the verdict and its photo."""
            def job():
                held, photo = self.session.held_detail(key)
                try:
                    name = self.session.bundle.product(held.product_id).name
                except AuditlensError:  # held for a product this bundle does not carry
                    name = held.product_id
                where = "memory" if held.key.startswith("memory:") else str(self.session.held_dir / held.key)
                return held, photo, self.session.thumbnail(held.product_id), name, where

            self._open_record(job, self.screens["record"].show_held, "Held verdict", refresh=True)

        def _open_record(self, job, show, what: str, refresh: bool = False) -> None:
            """Read on the worker, then fill the record view with ``show(*result)`` and open
            it, unless the auditor has moved on meanwhile; a failure is said on History,
            listed again with ``refresh`` (a held verdict the log took is a record now)."""
            asked = self._moves

            def ready(result):
                show(*result)
                if asked == self._moves:
                    self._show("record")

            def failed(exc):
                self.screens["history"].status.text = f"{what} could not be read: {exc}"
                if refresh and asked == self._moves:
                    self.show_history()

            self.worker.submit(job, ready, failed)

        def _open_history(self, asked: int) -> None:
            if asked == self._moves:
                self._show("history")

        def _history_ready(self, result, asked: int):
            records, report, error, (held, why_held) = result
            names = {p.product_id: p.name for p in self.session.bundle.products}
            self.screens["history"].show(records, report, error, names, held=held, why_held=why_held,
                                         held_dir=str(self.session.held_dir))
            self._open_history(asked)

        def _history_failed(self, exc, asked: int):
            self.screens["history"].show([], None, f"History could not be read: {exc}", {},
                                         held_dir=str(self.session.held_dir))
            self._open_history(asked)

        def export(self, kind: str):
            def done(path):
                self.last_export = path
                self.screens["history"].exported(path)

            self.worker.submit(lambda: self.session.export(kind, self.export_dir), done,
                               lambda e: self.screens["history"].export_failed(e))

    return AuditApp


def run(args) -> int:
    configure_kivy(args.size)
    AuditApp = build_app_class()
    app = AuditApp(bundle=args.bundle, camera_dir=args.camera_dir, log=args.log,
                   auditor=args.auditor, device=args.device, public_key=args.public_key,
                   log_key=args.log_key, export_dir=args.export_dir, camera_index=args.camera_index,
                   camera_rotation="auto" if args.camera_rotation == "auto" else int(args.camera_rotation))
    app.run()
    if app.load_error is not None:
        what = "audit log refused" if isinstance(app.load_error, AuditLogError) else "bundle refused"
        print(f"auditlens: error: {what}: {app.load_error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    from auditlens.cli import main

    sys.exit(main(["app", *sys.argv[1:]]))
