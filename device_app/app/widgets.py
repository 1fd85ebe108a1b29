"""Small Kivy widgets shared by the screens: colours, labels that wrap, buttons,
PIL-to-texture, the camera preview and its framing guide."""

from __future__ import annotations

from kivy.graphics import Color, Line, Rectangle
from kivy.graphics.texture import Texture
from kivy.metrics import dp, sp
from kivy.properties import ColorProperty, NumericProperty, ObjectProperty, StringProperty
from kivy.uix.behaviors import ButtonBehavior
from kivy.uix.boxlayout import BoxLayout
from kivy.uix.button import Button
from kivy.uix.image import Image as KImage
from kivy.uix.label import Label
from kivy.uix.widget import Widget
from PIL import Image

from auditlens.device_app.preprocess import crop_box

# -- theme ------------------------------------------------------------------------------
BG = (0.11, 0.13, 0.15, 1)
CARD = (0.18, 0.21, 0.24, 1)
TEXT = (0.95, 0.96, 0.97, 1)
MUTED = (0.70, 0.74, 0.78, 1)
ACCENT = (0.16, 0.50, 0.85, 1)
GREEN = (0.08, 0.45, 0.22, 1)  # white text on it: contrast about 7:1 (WCAG AA needs 4.5:1)
RED = (0.78, 0.18, 0.15, 1)
AMBER = (0.93, 0.66, 0.05, 1)
DARK_TEXT = (0.08, 0.08, 0.08, 1)

FONT = sp(18)
FONT_SMALL = sp(15)
FONT_BIG = sp(24)
FONT_HUGE = sp(44)


def pil_to_texture(image: Image.Image) -> Texture:
    """An RGB PIL image as a Kivy texture (call on the UI thread)."""
    image = image.convert("RGB")
    texture = Texture.create(size=image.size, colorfmt="rgb")
    texture.blit_buffer(image.tobytes(), colorfmt="rgb", bufferfmt="ubyte")
    texture.flip_vertical()
    return texture


class BgBox(BoxLayout):
    """A BoxLayout with a solid background colour."""

    bg = ColorProperty(BG)

    def __init__(self, **kw):
        super().__init__(**kw)
        with self.canvas.before:
            self._color = Color(*self.bg)
            self._rect = Rectangle(pos=self.pos, size=self.size)
        self.bind(pos=self._sync, size=self._sync, bg=self._sync)

    def _sync(self, *_):
        self._color.rgba = self.bg
        self._rect.pos, self._rect.size = self.pos, self.size


class ResponsiveBox(BgBox):
    """Stacks its children vertically in portrait and side by side in landscape."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.bind(size=self._orient)

    def _orient(self, *_):
        self.orientation = "horizontal" if self.width > self.height * 1.05 else "vertical"


class WrapLabel(Label):
    """A label that wraps to its width and grows to fit its text."""

    def __init__(self, **kw):
        kw.setdefault("font_size", FONT)
        kw.setdefault("color", TEXT)
        kw.setdefault("halign", "left")
        kw.setdefault("valign", "middle")
        kw.setdefault("size_hint_y", None)
        super().__init__(**kw)
        self.bind(width=self._wrap, texture_size=self._fit, text=self._fit)
        self._wrap()
        self._fit()

    def _wrap(self, *_):
        self.text_size = (max(self.width - dp(4), 1), None)

    def _fit(self, *_):
        self.height = self.texture_size[1] + dp(6) if self.text else 0  # no text: no room taken


class Btn(Button):
    """A flat, finger-sized button."""

    def __init__(self, text: str = "", bg=ACCENT, **kw):
        kw.setdefault("font_size", FONT)
        kw.setdefault("size_hint_y", None)
        kw.setdefault("height", dp(56))
        kw.setdefault("bold", True)
        super().__init__(text=text, background_normal="", background_down="",
                         background_color=bg, **kw)
        self._bg = bg
        self.bind(state=lambda *_: setattr(
            self, "background_color", [c * (0.75 if self.state == "down" else 1) for c in self._bg[:3]] + [1]))
        self.bind(disabled=lambda *_: setattr(self, "opacity", 0.45 if self.disabled else 1))

    def set_bg(self, bg) -> None:
        """Recolour the button (e.g. which of a screen's buttons is the primary one)."""
        self._bg = bg
        self.background_color = bg


class Thumb(KImage):
    """A picture that keeps its aspect ratio inside its box."""

    def __init__(self, image: Image.Image | None = None, **kw):
        kw.setdefault("fit_mode", "contain")
        super().__init__(**kw)
        if image is not None:
            self.texture = pil_to_texture(image)


class ProductRow(ButtonBehavior, BgBox):
    """One product in the picker: thumbnail, name, id; tap to select."""

    product_id = StringProperty("")

    def __init__(self, product_id: str, name: str, detail: str, texture=None,
                 interactive: bool = True, **kw):
        super().__init__(orientation="horizontal", size_hint_y=None, height=dp(84),
                         padding=dp(8), spacing=dp(12), bg=CARD, **kw)
        self.product_id = product_id
        thumb = KImage(size_hint_x=None, width=dp(68), fit_mode="contain")
        if texture is not None:
            thumb.texture = texture
        self.add_widget(thumb)
        text = BoxLayout(orientation="vertical")
        name_label = Label(text=name, font_size=FONT, bold=True, color=TEXT, halign="left",
                           valign="bottom", shorten=True, shorten_from="right")
        detail_label = Label(text=detail, font_size=FONT_SMALL, color=MUTED, halign="left",
                             valign="top", shorten=True, shorten_from="right")
        for lab in (name_label, detail_label):
            lab.bind(size=lambda w, *_: setattr(w, "text_size", w.size))
            text.add_widget(lab)
        self.add_widget(text)
        if interactive:
            self.bind(state=lambda *_: setattr(self, "bg", ACCENT if self.state == "down" else CARD))


class FramingGuide(Widget):
    """Corner brackets around the part of the picture the encoder looks at (the centred
    square, or the whole frame for a ``crop: full`` bundle), the outside dimmed, drawn
    over the picture that the ``source`` preview widget displays."""

    source = ObjectProperty(None, allownone=True)
    inset = NumericProperty(0.08)
    """Margin on each side, as a share of the cropped box (see :meth:`look_at`)."""
    crop = StringProperty("center")
    """The bundle's ``PreprocessSpec.crop``: 'center' (a square) or 'full' (the whole frame)."""

    def look_at(self, zoom: float, crop: str = "center") -> None:
        """Frame the part of the cropped box that a photo's first view keeps
        (``PreprocessSpec.photo_zooms[0]``); a plain view keeps a small margin."""
        self.inset = max(0.08, (1.0 - zoom) / 2)
        self.crop = crop

    def __init__(self, **kw):
        super().__init__(**kw)
        from kivy.clock import Clock

        self._trigger = Clock.create_trigger(self._draw, -1)
        self.bind(pos=self._trigger, size=self._trigger, inset=self._trigger, crop=self._trigger,
                  source=self._watch)

    def _watch(self, *_):
        if self.source is not None:
            for prop in ("pos", "size", "texture"):
                if prop in self.source.properties():
                    self.source.bind(**{prop: self._trigger})
        self._trigger()

    def image_rect(self) -> tuple[float, float, float, float]:
        if self.source is not None and hasattr(self.source, "norm_image_size") \
                and getattr(self.source, "texture", None) is not None:
            return displayed_rect(self.source)
        return (*self.pos, *self.size)

    def guide_rect(self) -> tuple[float, float, float, float]:
        """(x, y, width, height) of the guide, in window coordinates."""
        x, y, w, h = self.image_rect()
        left, top, right, bottom = crop_box((w, h), self.crop)  # the engine's own crop
        box_w, box_h = right - left, bottom - top
        gw, gh = box_w * (1 - 2 * self.inset), box_h * (1 - 2 * self.inset)
        return x + (w - gw) / 2, y + (h - gh) / 2, gw, gh

    def _draw(self, *_):
        self.canvas.clear()
        gx, gy, gw, gh = self.guide_rect()
        ix, iy, iw, ih = self.image_rect()
        with self.canvas:
            Color(0, 0, 0, 0.45)  # dim outside the guide (within the picture)
            Rectangle(pos=(ix, iy), size=(iw, gy - iy))
            Rectangle(pos=(ix, gy + gh), size=(iw, iy + ih - gy - gh))
            Rectangle(pos=(ix, gy), size=(gx - ix, gh))
            Rectangle(pos=(gx + gw, gy), size=(ix + iw - gx - gw, gh))
            Color(1, 1, 1, 0.95)
            arm = min(gw, gh) * 0.18
            width = dp(3)
            for cx, cy, dx, dy in ((gx, gy, 1, 1), (gx + gw, gy, -1, 1),
                                   (gx, gy + gh, 1, -1), (gx + gw, gy + gh, -1, -1)):
                Line(points=[cx + dx * arm, cy, cx, cy, cx, cy + dy * arm], width=width)
            Color(1, 1, 1, 0.35)
            Line(rectangle=(gx, gy, gw, gh), width=dp(1))


class FramePreview(KImage):
    """Shows a FileCamera's current frame (refreshed with ``refresh()``)."""

    def __init__(self, camera, **kw):
        kw.setdefault("fit_mode", "contain")
        super().__init__(**kw)
        self.camera = camera
        self._shown = None
        self.refresh()

    def refresh(self, *_):
        if self._shown == self.camera.index:
            return
        image = self.camera.frame()
        self._shown = self.camera.index
        # a file that cannot be read shows nothing, not the previous photo
        self.texture = pil_to_texture(image) if image is not None else None


def displayed_rect(image_widget: KImage) -> tuple[float, float, float, float]:
    """Where a 'contain'-fitted Image widget actually draws its picture."""
    w, h = image_widget.norm_image_size
    x = image_widget.center_x - w / 2
    y = image_widget.center_y - h / 2
    return x, y, w, h
