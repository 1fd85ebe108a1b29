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


class KivyCamera:
    """A real camera through Kivy's camera provider (webcam on a desktop, the phone's
    camera on Android)."""

    kind = "camera"

    def __init__(self, index: int = 0, resolution: tuple[int, int] = (1280, 720)) -> None:
        self.index = index
        self.resolution = resolution
        self.widget = None

    def preview_widget(self):
        from kivy.uix.camera import Camera

        try:
            self.widget = Camera(index=self.index, resolution=self.resolution, play=True,
                                 fit_mode="contain")
        except Exception as exc:  # noqa: BLE001 - providers raise anything
            raise CameraUnavailable(f"no camera could be opened ({exc}); run the app with "
                                    "--camera-dir FOLDER to play photo files instead") from exc
        if getattr(self.widget, "_camera", None) is None:
            raise CameraUnavailable("no camera provider could open a camera; run the app with "
                                    "--camera-dir FOLDER to play photo files instead")
        return self.widget

    def start(self) -> None:
        if self.widget is not None:
            self.widget.play = True

    def stop(self) -> None:
        if self.widget is not None:
            self.widget.play = False

    def _texture_image(self) -> Image.Image | None:
        """The current frame as an upright RGB image (GL textures are stored bottom row
        first); None before the camera delivered one. Call on the UI thread."""
        texture = getattr(self.widget, "texture", None)
        if texture is None:
            return None
        image = Image.frombytes("RGBA", texture.size, texture.pixels).convert("RGB")
        return image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)

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
