"""Cameras for the field app, behind one small interface.

``FileCamera`` plays a folder of image files as the camera (demos, tests, and replaying
photos taken with another app); ``KivyCamera`` wraps Kivy's camera widget for a real
webcam or phone camera. Both give the app:

* ``frame()``: the current frame as an RGB PIL image (for the live quality hint and
  barcode scanning, analysed off the UI thread), or None;
* ``capture()``: the photo to verify, as encoded bytes (what gets hashed and logged);
* ``start()`` / ``stop()``; and, for the preview, the widget that ``preview_widget()``
  builds (Kivy, created on the UI thread).
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, ImageOps

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class CameraUnavailable(RuntimeError):
    """No camera could be opened."""


class FileCamera:
    """Plays the image files of a folder (sorted by name) as camera frames."""

    kind = "files"

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CameraUnavailable(f"{self.folder}: no such folder of photos")
        self.files = sorted(p for p in self.folder.iterdir()
                            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not self.files:
            raise CameraUnavailable(f"{self.folder}: no image files to play as the camera")
        self.index = 0
        self._frame_cache: tuple[int, int, Image.Image] | None = None
        """(file index, max_side, frame) of the last decoded frame."""

    @property
    def current(self) -> Path:
        return self.files[self.index]

    def select(self, name: str) -> None:
        """Point the camera at the file named ``name`` (file name or stem)."""
        for i, p in enumerate(self.files):
            if name in (p.name, p.stem):
                self.index = i
                self._frame_cache = None
                return
        raise KeyError(f"{name}: not in {self.folder}")

    def step(self, delta: int = 1) -> None:
        self.index = (self.index + delta) % len(self.files)
        self._frame_cache = None

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def frame(self, max_side: int = 1024) -> Image.Image | None:
        # the index is read once: the UI may step to the next file while a background
        # frame check decodes this one, and the frame must be cached under its own file
        index = self.index
        cached = self._frame_cache
        if cached and cached[:2] == (index, max_side):
            return cached[2]
        try:
            with Image.open(self.files[index]) as im:
                im.draft("RGB", (max_side, max_side))
                image = ImageOps.exif_transpose(im).convert("RGB")
        except Exception:  # noqa: BLE001 - a broken file shows as no frame; capture reports it
            return None
        image.thumbnail((max_side, max_side))
        self._frame_cache = (index, max_side, image)
        return image

    def capture(self) -> bytes:
        return self.current.read_bytes()

    def preview_widget(self):
        from auditlens.device_app.app.widgets import FramePreview

        return FramePreview(self)


ROTATIONS = (0, 90, 180, 270)


def upright_rotation(sensor_degrees: int, display_degrees: int) -> int:
    """Degrees clockwise that turn a back camera's frame upright on the screen, from the
    angle its sensor is mounted at (Android's ``CameraInfo.orientation``: the clockwise turn
    that makes its frames upright in the device's natural orientation) and the display's
    rotation from that orientation (``Display.getRotation()`` in degrees)."""
    if sensor_degrees % 90 or display_degrees % 90:
        raise ValueError(f"camera and display rotations are multiples of 90 degrees, "
                         f"not {sensor_degrees} and {display_degrees}")
    return (sensor_degrees - display_degrees) % 360


def android_frame_rotation(index: int = 0) -> int | None:
    """:func:`upright_rotation` for camera ``index`` of the Android device the app runs
    on, read through pyjnius; None off Android, for a front camera (its frames are mirrored
    on screen: pass the rotation by hand) or when the platform will not say."""
    try:
        from jnius import autoclass  # only on Android (python-for-android ships pyjnius)
    except ImportError:
        return None
    try:
        info_class = autoclass("android.hardware.Camera$CameraInfo")
        info = info_class()
        autoclass("android.hardware.Camera").getCameraInfo(index, info)
        if info.facing != info_class.CAMERA_FACING_BACK:
            return None
        activity = autoclass("org.kivy.android.PythonActivity").mActivity
        surface_rotation = activity.getWindowManager().getDefaultDisplay().getRotation()
        return upright_rotation(int(info.orientation), 90 * int(surface_rotation))
    except Exception:  # noqa: BLE001 - any platform failure: treat the frames as upright
        return None


def texture_to_image(size: tuple[int, int], rgba: bytes, rotation: int = 0) -> Image.Image:
    """An upright RGB image from a GL texture's RGBA pixels (stored bottom row first),
    turned ``rotation`` degrees clockwise."""
    if rotation not in ROTATIONS:
        raise ValueError(f"rotation must be one of {ROTATIONS}, not {rotation}")
    image = Image.frombytes("RGBA", size, rgba).convert("RGB").transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    turn = {90: Image.Transpose.ROTATE_270, 180: Image.Transpose.ROTATE_180,
            270: Image.Transpose.ROTATE_90}.get(rotation)  # PIL's ROTATE_n turn counter-clockwise
    return image.transpose(turn) if turn is not None else image


def no_camera_advice(platform: str | None = None) -> str:
    """What the auditor can do when no camera opens: on a phone, allow the app camera
    access; on a desktop, play photo files instead."""
    if platform is None:
        from kivy.utils import platform
    if platform in ("android", "ios"):
        return "allow auditlens to use the camera in the device's Settings (Apps > auditlens > Permissions)"
    return "run the app with --camera-dir FOLDER to play photo files instead"


def request_camera_permission(answered) -> bool:
    """On Android, ask for the camera (a runtime permission since Android 6: the camera
    does not open until the user allows it); ``answered(granted)`` is called, possibly
    on another thread, when the user has chosen. Returns False, and asks nothing, off
    Android or when the permission is already granted."""
    try:
        from android.permissions import Permission, check_permission, request_permissions
    except ImportError:  # not Android (python-for-android ships this module)
        return False
    if check_permission(Permission.CAMERA):
        return False
    request_permissions([Permission.CAMERA], lambda _names, grants: answered(bool(grants) and all(grants)))
    return True


class KivyCamera:
    """A real camera through Kivy's camera provider (webcam on a desktop, the phone's
    camera on Android).

    ``rotation``: degrees clockwise that make the camera's frames upright, applied to the
    preview and to every frame and capture; ``"auto"`` asks Android (sensor mounting and
    display rotation, :func:`android_frame_rotation`) and is 0 elsewhere. Auto is asked
    again whenever a frame is read or the camera restarts, so turning the phone between
    portrait and landscape keeps the frames upright. Kivy's Android provider delivers the sensor's landscape frames, which a
    phone held upright would otherwise verify lying on their side."""

    kind = "camera"

    def __init__(self, index: int = 0, resolution: tuple[int, int] = (1280, 720),
                 rotation: int | str = "auto") -> None:
        if rotation != "auto" and rotation not in ROTATIONS:
            raise ValueError(f"rotation must be 'auto' or one of {ROTATIONS}, not {rotation!r}")
        self.index = index
        self.resolution = resolution
        self.auto = rotation == "auto"
        self.rotation = 0 if self.auto else rotation
        self.widget = None
        self._turn = None  # the preview's Rotate instruction

    def preview_widget(self):
        from kivy.uix.camera import Camera

        try:
            self.widget = Camera(index=self.index, resolution=self.resolution, play=True,
                                 fit_mode="contain")
        except Exception as exc:  # noqa: BLE001 - providers raise anything
            raise CameraUnavailable(f"no camera could be opened ({exc}); {no_camera_advice()}") from exc
        if getattr(self.widget, "_camera", None) is None:
            raise CameraUnavailable(f"no camera provider could open a camera; {no_camera_advice()}")
        self._rotate_preview(self.widget)
        self.update_rotation()
        return self.widget

    def _rotate_preview(self, widget) -> None:
        """Put a turn (:attr:`rotation` degrees clockwise, about the centre) into the
        preview's drawing; :meth:`update_rotation` changes its angle."""
        from kivy.graphics import PopMatrix, PushMatrix, Rotate

        with widget.canvas.before:
            PushMatrix()
            self._turn = turn = Rotate(angle=-self.rotation, origin=widget.center)  # Kivy turns counter-clockwise
        with widget.canvas.after:
            PopMatrix()
        widget.bind(center=lambda w, center: setattr(turn, "origin", center))

    def update_rotation(self) -> int:
        """Ask Android again how the frames stand (auto only: the phone may have turned
        since the last frame) and turn the preview to match; returns the rotation."""
        if self.auto:
            self.rotation = android_frame_rotation(self.index) or 0
        if self._turn is not None:
            self._turn.angle = -self.rotation
        return self.rotation

    def start(self) -> None:
        if self.widget is not None:
            self.update_rotation()
            self.widget.play = True

    def stop(self) -> None:
        if self.widget is not None:
            self.widget.play = False

    def _texture_image(self) -> Image.Image | None:
        """The current frame as an upright RGB image; None before the camera delivered
        one. Call on the UI thread."""
        texture = getattr(self.widget, "texture", None)
        if texture is None:
            return None
        return texture_to_image(texture.size, texture.pixels, self.update_rotation())

    def frame(self, max_side: int = 1024) -> Image.Image | None:
        """Read the current frame (call on the UI thread: it reads the GL texture)."""
        image = self._texture_image()
        if image is not None:
            image.thumbnail((max_side, max_side))
        return image

    def capture(self) -> bytes:
        image = self._texture_image()
        if image is None:
            raise CameraUnavailable("the camera has not delivered a frame yet")
        out = io.BytesIO()
        image.save(out, "JPEG", quality=92)
        return out.getvalue()


def scan_codes(image: Image.Image) -> list[str]:
    """Barcodes / QR codes in a frame, with zxing-cpp when it is installed (else [])."""
    try:
        import numpy as np
        import zxingcpp
    except ImportError:
        return []
    try:
        return [r.text for r in zxingcpp.read_barcodes(np.asarray(image.convert("RGB"))) if r.text]
    except Exception:  # noqa: BLE001 - a scanner failure must never take the app down
        return []


def scanner_available() -> bool:
    try:
        import zxingcpp  # noqa: F401
    except ImportError:
        return False
    return True
