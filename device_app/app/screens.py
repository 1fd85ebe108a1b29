"""The field app's screens: loading, refusal, product picker, camera, verdict, history.

Screens only show things and forward taps to the app (``App.get_running_app()``); the
work happens in :mod:`auditlens.device_app.app.session` on the worker thread.
"""

from __future__ import annotations

from datetime import datetime

from kivy.app import App
from kivy.graphics import Color, Line, Rectangle
from kivy.metrics import dp
from kivy.uix.behaviors import ButtonBehavior
from kivy.uix.boxlayout import BoxLayout
from kivy.uix.floatlayout import FloatLayout
from kivy.uix.gridlayout import GridLayout
from kivy.uix.label import Label
from kivy.uix.screenmanager import Screen
from kivy.uix.scrollview import ScrollView
from kivy.uix.textinput import TextInput
from kivy.uix.widget import Widget

from auditlens.device_app.app.session import NO_MATCH_ADVICE, history_judgement
from auditlens.device_app.app.widgets import (
    ACCENT,
    AMBER,
    BG,
    CARD,
    DARK_TEXT,
    FONT,
    FONT_BIG,
    FONT_HUGE,
    FONT_SMALL,
    GREEN,
    MUTED,
    RED,
    TEXT,
    BgBox,
    Btn,
    FramingGuide,
    ProductRow,
    ResponsiveBox,
    Thumb,
    WrapLabel,
    pil_to_texture,
)
from auditlens.device_app.verifier import far_share, score_against_threshold

DECISION_STYLE = {
    "match": ("MATCH", GREEN, TEXT),
    "no_match": ("NO MATCH", RED, TEXT),
    "retake": ("RETAKE", AMBER, DARK_TEXT),
}


def app():
    return App.get_running_app()


def header(title: str, *, left: Btn | None = None, right: Btn | None = None, bg=CARD) -> BgBox:
    bar = BgBox(orientation="horizontal", size_hint_y=None, height=dp(64), padding=dp(6),
                spacing=dp(6), bg=bg)
    if left is not None:
        left.size_hint = (None, 1)
        left.width = dp(130)
        bar.add_widget(left)
    lab = Label(text=title, font_size=FONT_BIG, bold=True, color=TEXT, halign="left",
                valign="middle", shorten=True, shorten_from="right", padding=(dp(8), 0))
    lab.bind(size=lambda w, *_: setattr(w, "text_size", w.size))
    bar.add_widget(lab)
    if right is not None:
        right.size_hint = (None, 1)
        right.width = dp(130)
        bar.add_widget(right)
    bar.title_label = lab
    return bar


def side_by_side(photo_caption: str) -> tuple[BoxLayout, Thumb, Thumb, Label]:
    """The catalogue original and a photo side by side, captioned: the row, its two
    pictures (their textures set when shown) and the photo's caption."""
    pics = BoxLayout(orientation="horizontal", spacing=dp(8))
    original, photo = Thumb(), Thumb()
    captions = []
    for caption, image in (("Catalogue original", original), (photo_caption, photo)):
        col = BgBox(orientation="vertical", bg=CARD, padding=dp(6), spacing=dp(4))
        col.add_widget(image)
        captions.append(Label(text=caption, font_size=FONT_SMALL, color=MUTED, size_hint_y=None,
                              height=dp(26)))
        col.add_widget(captions[-1])
        pics.add_widget(col)
    return pics, original, photo, captions[1]


def scroll_list(spacing: float = 6) -> tuple[ScrollView, GridLayout]:
    grid = GridLayout(cols=1, size_hint_y=None, spacing=dp(spacing), padding=(0, dp(2)))
    grid.bind(minimum_height=grid.setter("height"))
    view = ScrollView(do_scroll_x=False, bar_width=dp(6))
    view.add_widget(grid)
    return view, grid


# -- loading and refusal ----------------------------------------------------------------
class LoadingScreen(Screen):
    def __init__(self, **kw):
        super().__init__(name="loading", **kw)
        box = BgBox(orientation="vertical", padding=dp(24))
        self.label = Label(text="Checking the reference bundle...", font_size=FONT_BIG, color=TEXT)
        box.add_widget(self.label)
        self.add_widget(box)


class RefusalScreen(Screen):
    """Shown instead of the app when the bundle fails its checks: nothing can be verified."""

    def __init__(self, **kw):
        super().__init__(name="refusal", **kw)
        box = BgBox(orientation="vertical", padding=dp(20), spacing=dp(16))
        self.bar = header("Bundle refused", bg=RED)
        box.add_widget(self.bar)
        self.title = WrapLabel(text="", font_size=FONT_BIG, bold=True)
        self.message = WrapLabel(text="", font_size=FONT)
        self.advice = WrapLabel(text="", font_size=FONT, color=MUTED)
        for w in (self.title, self.message, self.advice):
            box.add_widget(w)
        box.add_widget(Widget())
        quit_button = Btn("Quit", bg=CARD)
        quit_button.bind(on_release=lambda *_: app().stop())
        box.add_widget(quit_button)
        self.add_widget(box)

    def show(self, kind: str, message: str, bundle_path: str) -> None:
        self.bar.title_label.text = "Bundle refused"
        titles = {
            "BundleIntegrityError": "This reference bundle failed its integrity check.",
            "ModelMismatchError": "The model and the reference latents do not belong together.",
            "BundleSignatureError": "This reference bundle is not signed by your publisher.",
            "BundleFormatError": "This is not a usable reference bundle.",
        }
        self.title.text = titles.get(kind, "The reference bundle could not be loaded.")
        self.message.text = message
        self.advice.text = (
            "No verification is possible with it, and none will be logged. Reinstall the "
            f"bundle from your publisher, then start the app again.\n\nBundle: {bundle_path}")

    def show_log(self, kind: str, message: str, log_path: str) -> None:
        """The bundle is fine; the audit log cannot be opened (full disk, another file at
        its path, or a log edited outside auditlens)."""
        tampered, keyless = kind == "AuditChainError", kind == "AuditLogKeyError"
        self.bar.title_label.text = "AUDIT LOG TAMPERED" if tampered else "Audit log unavailable"
        self.title.text = ("The audit log was edited outside auditlens." if tampered
                           else "This device's signing key is missing." if keyless
                           else "The audit log could not be opened.")
        self.message.text = message
        self.advice.text = (
            "No verification is possible without a log to keep it in. "
            + ("Do not delete the file: hand the device to your supervisor, who can check it "
               "with `auditlens verify-log`." if tampered else
               "The log's records are signed by this device's key, and the app was started "
               "without it. Do not delete the log or start a new one: ask your administrator to "
               "install the device key, then start the app again." if keyless else
               "Free some storage or move the file that is in the way, then start the app "
               "again.") + f"\n\nAudit log: {log_path}")


# -- product picker --------------------------------------------------------------------
class PickerScreen(Screen):
    def __init__(self, **kw):
        super().__init__(name="picker", **kw)
        self._textures: dict[str, object] = {}
        root = BgBox(orientation="vertical", spacing=dp(8))
        history = Btn("History", bg=ACCENT)
        history.bind(on_release=lambda *_: app().show_history())
        root.add_widget(header("Pick the product", right=history))

        body = BoxLayout(orientation="vertical", padding=(dp(12), 0, dp(12), dp(8)), spacing=dp(8))
        self.info = WrapLabel(text="", font_size=FONT_SMALL, color=MUTED)
        body.add_widget(self.info)

        who = BoxLayout(size_hint_y=None, height=dp(48), spacing=dp(8))
        who.add_widget(Label(text="Auditor", font_size=FONT, color=TEXT, size_hint_x=None,
                             width=dp(90)))
        self.auditor = TextInput(multiline=False, font_size=FONT, hint_text="your name",
                                 padding=(dp(10), dp(12)))
        self.auditor.bind(text=lambda _w, text: app().set_auditor(text),
                          focus=lambda w, focused: focused or app().set_auditor(w.text, remember=True))
        who.add_widget(self.auditor)
        body.add_widget(who)

        row = BoxLayout(size_hint_y=None, height=dp(52), spacing=dp(8))
        self.search = TextInput(multiline=False, font_size=FONT, padding=(dp(10), dp(14)),
                                hint_text="Search by name, id or code")
        self.search.bind(text=lambda *_: self.refresh())
        row.add_widget(self.search)
        self.scan = Btn("Scan code", bg=ACCENT, size_hint=(None, 1), width=dp(140))
        self.scan.bind(on_release=lambda *_: app().start_scan())
        row.add_widget(self.scan)
        body.add_widget(row)

        self.count = WrapLabel(text="", font_size=FONT_SMALL, color=MUTED)
        body.add_widget(self.count)
        view, self.grid = scroll_list()
        body.add_widget(view)
        root.add_widget(body)
        self.add_widget(root)

    def setup(self, session, scanner: bool) -> None:
        self.info.text = session.summary()
        attention = session.needs_attention()  # unsigned or uncalibrated: said so, not in muted grey
        self.info.color, self.info.bold = (AMBER, True) if attention else (MUTED, False)
        self.auditor.text = session.auditor
        if not scanner:
            self.scan.disabled = True
            self.scan.text = "No scanner"
        self.refresh()

    def texture(self, product_id: str):
        if product_id not in self._textures:
            thumbnail = app().session.thumbnail(product_id)
            self._textures[product_id] = pil_to_texture(thumbnail) if thumbnail is not None else None
        return self._textures[product_id]

    def refresh(self) -> None:
        session = app().session
        if session is None or session.verifier is None:
            return
        query = self.search.text
        hits, total = session.search(query)
        self.grid.clear_widgets()
        for p in hits:
            detail = p.product_id + (f" - {p.group}" if p.group and p.group != p.name else "")
            if p.code:
                detail += f" - code {p.code}"
            row = ProductRow(p.product_id, p.name, detail, self.texture(p.product_id))
            row.bind(on_release=lambda w: app().select_product(w.product_id))
            self.grid.add_widget(row)
        n = len(session.bundle.products)
        if not query.strip():
            self.count.text = f"{n} products. Tap the one you are auditing."
        elif total:
            more = f" (showing {len(hits)})" if total > len(hits) else ""
            self.count.text = f"{total} of {n} products match '{query.strip()}'{more}"
        else:
            self.count.text = f"No product matches '{query.strip()}'"


# -- camera -------------------------------------------------------------------------------
class CameraScreen(Screen):
    def __init__(self, **kw):
        super().__init__(name="camera", **kw)
        self.preview = None
        root = BgBox(orientation="vertical")
        back = Btn("< Products", bg=CARD)
        back.bind(on_release=lambda *_: app().go_picker())
        self.bar = header("", left=back)
        root.add_widget(self.bar)

        self.body = ResponsiveBox(spacing=dp(8), padding=dp(8))
        self.stage = FloatLayout(size_hint=(1, 1))
        self.guide = FramingGuide(size_hint=(1, 1), pos_hint={"x": 0, "y": 0})
        self.hint = Label(text="", font_size=FONT, bold=True, color=TEXT, size_hint=(1, None),
                          height=dp(44), pos_hint={"x": 0, "y": 0}, halign="center")
        with self.hint.canvas.before:
            Color(0, 0, 0, 0.55)
            self._hint_bg = Rectangle()
        self.hint.bind(pos=self._sync_hint, size=self._sync_hint)
        # a hint says what to do too ("too dark: turn on more light ..."): it wraps and grows
        self.hint.bind(width=lambda w, *_: setattr(w, "text_size", (w.width - dp(16), None)),
                       texture_size=lambda w, ts: setattr(w, "height", max(dp(44), ts[1] + dp(12))))
        self.body.add_widget(self.stage)

        self.panel = BoxLayout(orientation="vertical", spacing=dp(8))
        top = BgBox(orientation="horizontal", spacing=dp(10), padding=dp(8), bg=CARD,
                    size_hint_y=None, height=dp(150))
        self.original = Thumb(size_hint_x=None, width=dp(130))
        top.add_widget(self.original)
        words = BoxLayout(orientation="vertical")
        words.add_widget(WrapLabel(text="Catalogue original", font_size=FONT_SMALL, color=MUTED))
        self.product_name = WrapLabel(text="", font_size=FONT_BIG, bold=True)
        self.pid = WrapLabel(text="", font_size=FONT_SMALL, color=MUTED)
        for w in (self.product_name, self.pid):
            words.add_widget(w)
        words.add_widget(Widget())
        top.add_widget(words)
        self.panel.add_widget(top)

        self.files = BoxLayout(size_hint_y=None, height=dp(52), spacing=dp(6))
        prev_b, next_b = Btn("<", bg=CARD, size_hint_x=None, width=dp(64)), \
            Btn(">", bg=CARD, size_hint_x=None, width=dp(64))
        prev_b.bind(on_release=lambda *_: app().step_camera(-1))
        next_b.bind(on_release=lambda *_: app().step_camera(1))
        self.file_label = Label(text="", font_size=FONT_SMALL, color=MUTED, shorten=True)
        self.file_label.bind(size=lambda w, *_: setattr(w, "text_size", w.size))
        self.file_label.halign, self.file_label.valign = "center", "middle"
        for w in (prev_b, self.file_label, next_b):
            self.files.add_widget(w)
        self.panel.add_widget(self.files)
        self.panel.add_widget(Widget(size_hint_y=0.01))
        self.capture = Btn("CAPTURE", bg=GREEN, height=dp(76), font_size=FONT_BIG)
        self.capture.bind(on_release=lambda *_: app().capture())
        self.panel.add_widget(self.capture)
        self.body.add_widget(self.panel)
        self.body.bind(orientation=self._layout)
        root.add_widget(self.body)
        self.add_widget(root)

    def _sync_hint(self, *_):
        self._hint_bg.pos, self._hint_bg.size = self.hint.pos, self.hint.size
        self.hint.text_size = self.hint.size
        self.hint.valign = "middle"

    def _layout(self, *_):
        if self.body.orientation == "horizontal":
            self.stage.size_hint = (0.62, 1)
            self.panel.size_hint = (0.38, 1)
        else:
            self.stage.size_hint = (1, 0.66)
            self.panel.size_hint = (1, 0.34)

    def attach_preview(self, widget) -> None:
        self.stage.clear_widgets()
        self.preview = widget
        widget.size_hint, widget.pos_hint = (1, 1), {"x": 0, "y": 0}
        self.stage.add_widget(widget)
        self.stage.add_widget(self.guide)
        self.stage.add_widget(self.hint)
        self.guide.source = widget

    def show_product(self, record, thumbnail, *, scanning: bool = False) -> None:
        if scanning:
            self.bar.title_label.text = "Scan a barcode or QR code"
            self.product_name.text, self.pid.text = "Point the camera at the code", ""
            self.original.texture = None
            self.capture.disabled = True
            self.capture.text = "SCANNING..."
        else:
            self.bar.title_label.text = f"Audit: {record.name}"
            self.product_name.text, self.pid.text = record.name, f"id {record.product_id}"
            self.original.texture = pil_to_texture(thumbnail) if thumbnail is not None else None
            self.capture.disabled = False
            self.capture.text = "CAPTURE"
        self.hint.text = "Fill the framing guide with the product"

    def show_unavailable(self, message: str) -> None:
        """No camera: say so where the preview would be, and offer no capture."""
        self.stage.clear_widgets()
        self.preview = None
        box = BgBox(orientation="vertical", padding=dp(24), bg=CARD,
                    size_hint=(1, 1), pos_hint={"x": 0, "y": 0})
        box.add_widget(Widget())
        box.add_widget(WrapLabel(text="No camera", font_size=FONT_BIG, bold=True, halign="center"))
        box.add_widget(WrapLabel(text=message, font_size=FONT, color=MUTED, halign="center"))
        box.add_widget(Widget())
        self.stage.add_widget(box)
        self.files.opacity, self.files.disabled = 0, True
        self.capture.disabled = True

    def show_files(self, camera) -> None:
        self.files.opacity = 1 if camera.kind == "files" else 0
        self.files.disabled = camera.kind != "files"
        if camera.kind == "files":
            if self.preview is not None and hasattr(self.preview, "refresh"):
                self.preview.refresh()
            unreadable = getattr(self.preview, "texture", True) is None
            self.file_label.text = (f"photo {camera.index + 1}/{len(camera.files)}: {camera.current.name}"
                                    + (" (cannot be read)" if unreadable else ""))

    def busy(self, busy: bool) -> None:
        self.capture.disabled = busy
        self.capture.text = "VERIFYING..." if busy else "CAPTURE"


# -- verdict --------------------------------------------------------------------------------
class ScoreBar(Widget):
    """The score on a -1..1 scale... shown 0..1, with the threshold marked."""

    def set(self, score: float, threshold: float, colour) -> None:
        self._values = (score, threshold, colour)
        self.bind(pos=self._draw, size=self._draw)
        self._draw()

    def _draw(self, *_):
        score, threshold, colour = getattr(self, "_values", (0, 0, CARD))
        self.canvas.clear()
        x, y, w, h = self.x, self.y, self.width, self.height
        clip = lambda v: min(max(v, 0.0), 1.0)  # noqa: E731
        with self.canvas:
            Color(*CARD)
            Rectangle(pos=(x, y), size=(w, h))
            Color(*colour)
            Rectangle(pos=(x, y), size=(w * clip(score), h))
            Color(1, 1, 1, 1)
            tx = x + w * clip(threshold)
            Line(points=[tx, y - dp(4), tx, y + h + dp(4)], width=dp(2))


class VerdictScreen(Screen):
    def __init__(self, **kw):
        super().__init__(name="verdict", **kw)
        self._suggestion_textures: dict[str, object] = {}
        root = BgBox(orientation="vertical")
        self.banner = BgBox(orientation="vertical", size_hint_y=None, height=dp(128),
                            padding=(dp(12), dp(6)), bg=GREEN)
        self.word = Label(text="", font_size=FONT_HUGE, bold=True, color=TEXT)
        self.subject = Label(text="", font_size=FONT, color=TEXT, shorten=True,
                             size_hint_y=None, height=dp(30))
        self.subject.bind(size=lambda w, *_: setattr(w, "text_size", w.size))
        self.subject.halign = "center"
        self.banner.add_widget(self.word)
        self.banner.add_widget(self.subject)
        root.add_widget(self.banner)

        self.body = ResponsiveBox(spacing=dp(10), padding=dp(10))
        pics, self.original, self.photo, _ = side_by_side("Your photo")
        self.pics = pics
        self.body.add_widget(pics)

        details_view, self.details = scroll_list(spacing=8)
        self.details_view = details_view
        self.body.add_widget(details_view)
        self.body.bind(orientation=self._layout)
        root.add_widget(self.body)

        buttons = BoxLayout(size_hint_y=None, height=dp(64), spacing=dp(8), padding=(dp(10), dp(4)))
        retake = self.retake_button = Btn("Retake", bg=ACCENT, height=dp(56))
        retake.bind(on_release=lambda *_: app().go_camera())
        nxt = self.next_button = Btn("Next product", bg=CARD, height=dp(56))
        nxt.bind(on_release=lambda *_: app().go_picker())
        hist = Btn("History", bg=CARD, height=dp(56))
        hist.bind(on_release=lambda *_: app().show_history())
        for b in (retake, nxt, hist):
            buttons.add_widget(b)
        root.add_widget(buttons)
        self.add_widget(root)

    def _layout(self, *_):
        if self.body.orientation == "horizontal":
            self.pics.size_hint = (0.55, 1)
            self.details_view.size_hint = (0.45, 1)
        else:
            self.pics.size_hint = (1, 0.5)
            self.details_view.size_hint = (1, 0.5)

    def show(self, outcome, record, original, suggestion_thumbs: dict) -> None:
        d = self.details
        d.clear_widgets()
        if outcome.verdict is None:
            self.word.text, self.banner.bg = "RETAKE", AMBER
            self.word.color = self.subject.color = DARK_TEXT
            self.subject.text = f"{record.name}  ({record.product_id})"
            self.original.texture = pil_to_texture(original) if original is not None else None
            self.photo.texture = None
            d.add_widget(WrapLabel(text="The photo could not be read; nothing was logged.",
                                   font_size=FONT_BIG, bold=True))
            d.add_widget(WrapLabel(text=outcome.error, color=MUTED))
            return
        v = outcome.verdict
        word, colour, ink = DECISION_STYLE[v.decision]
        self.word.text, self.banner.bg = word, colour
        self.word.color = self.subject.color = ink
        self.subject.text = f"{record.name}  ({record.product_id})"
        self.original.texture = pil_to_texture(original) if original is not None else None
        self.photo.texture = pil_to_texture(outcome.capture) if outcome.capture is not None else None
        # after a MATCH the next step is the next product; otherwise, most often, a retake
        self.next_button.set_bg(ACCENT if v.decision == "match" else CARD)
        self.retake_button.set_bg(CARD if v.decision == "match" else ACCENT)
        if outcome.log_error:  # first, where it cannot be missed under the verdict
            d.add_widget(WrapLabel(
                text=f"NOT LOGGED YET: {outcome.log_error}. The verdict is held on this device "
                     "and written to the log as soon as it works again (next capture, History, or "
                     "the next start).", font_size=FONT, bold=True, color=AMBER))

        if v.decision == "retake":
            d.add_widget(WrapLabel(text="Not judged: take the photo again.", font_size=FONT_BIG,
                                   bold=True))
            for reason in v.reasons:
                d.add_widget(WrapLabel(text=f"- {reason}", font_size=FONT))
        else:
            cmp = ">=" if v.decision == "match" else "<"
            d.add_widget(WrapLabel(text=score_against_threshold(v.score, v.threshold, cmp, word="Score"),
                                   font_size=FONT_BIG, bold=True))
            bar = ScoreBar(size_hint_y=None, height=dp(16))
            bar.set(v.score, v.threshold, colour)
            d.add_widget(bar)
            if v.first_score is not None:  # the second look near the threshold decided
                first = score_against_threshold(v.first_score, v.first_threshold, "near", word="first score")
                d.add_widget(WrapLabel(
                    text=f"Close to the line at first ({first}): judged again with its view also "
                         "moved left, right, up and down.", font_size=FONT_SMALL, color=MUTED))
            if v.estimated_far is not None:
                share = far_share(v.estimated_far)
                text = ("No different product scored this high in the calibration photos."
                        if share is None else
                        f"A different product scores this high in {share} of calibration photos.")
                d.add_widget(WrapLabel(text=text, font_size=FONT_SMALL, color=MUTED))
            if v.decision == "no_match":
                d.add_widget(WrapLabel(text=NO_MATCH_ADVICE, font_size=FONT))
        if v.suggestions:
            heading = ("The photo looks more like:" if v.outscored
                       else "Closest other products (none scores higher):")
            d.add_widget(WrapLabel(text=heading, font_size=FONT, bold=True))
            for c in v.suggestions:
                texture = self._suggestion_textures.get(c.product_id)
                if texture is None and suggestion_thumbs.get(c.product_id) is not None:
                    texture = pil_to_texture(suggestion_thumbs[c.product_id])
                    self._suggestion_textures[c.product_id] = texture
                # information only: the audited product stays the one picked
                row = ProductRow(c.product_id, c.name, f"{c.product_id} - score {c.score:.3f}",
                                 texture, interactive=False)
                d.add_widget(row)
        q = v.quality
        d.add_widget(WrapLabel(
            text=f"Capture: brightness {q.brightness:.0f}, sharpness {q.sharpness:.0f}, "
                 f"detail {q.centre_detail:.0f}", font_size=FONT_SMALL, color=MUTED))
        if not outcome.log_error:
            d.add_widget(WrapLabel(
                text=f"Logged as record #{outcome.record_id} - verified in "
                     f"{outcome.seconds * 1000:.0f} ms - model {v.model_id[:8]}",
                font_size=FONT_SMALL, color=MUTED))


# -- history ----------------------------------------------------------------------------------
class HistoryRow(ButtonBehavior, BgBox):
    """One line of History: a chip with the decision, two lines of text; tap it to open."""

    def __init__(self, chip: tuple[str, tuple, tuple], top: str, bottom: str, on_open, **kw):
        super().__init__(orientation="horizontal", size_hint_y=None, height=dp(70),
                         padding=dp(8), spacing=dp(10), bg=CARD, **kw)
        self.bind(on_release=lambda *_: on_open())
        word, colour, ink = chip
        badge = BgBox(size_hint_x=None, width=dp(112), bg=colour)
        badge.add_widget(Label(text=word, bold=True, font_size=FONT_SMALL, color=ink))
        self.add_widget(badge)
        lines = BoxLayout(orientation="vertical")
        top_label = Label(text=top, font_size=FONT, bold=True, color=TEXT, shorten=True,
                          shorten_from="right")
        bottom_label = Label(text=bottom, font_size=FONT_SMALL, color=MUTED, shorten=True,
                             shorten_from="right")
        for lab in (top_label, bottom_label):
            lab.halign, lab.valign = "left", "middle"
            lab.bind(size=lambda w, *_: setattr(w, "text_size", w.size))
            lines.add_widget(lab)
        self.add_widget(lines)


def decision_word(decision: str) -> str:
    """A decision as the app shows it (MATCH, NO MATCH, RETAKE; another in capitals)."""
    return DECISION_STYLE.get(decision, (decision.upper(),))[0]


def utc_stamp(iso: str) -> str:
    """An ISO time as History shows it (as given when it does not parse)."""
    try:
        return datetime.fromisoformat(iso.replace("Z", "+00:00")).strftime("%Y-%m-%d %H:%M:%S UTC")
    except ValueError:
        return iso


def record_row(record, name: str) -> HistoryRow:
    """A record of the log; tap it for the record with its photo."""
    record_id = record.id
    return HistoryRow(DECISION_STYLE.get(record.decision, (record.decision, CARD, TEXT)),
                      f"#{record.id}  {name}",
                      f"{utc_stamp(record.created_utc)} - {history_judgement(record)} - "
                      f"{record.auditor or 'no auditor'}",
                      lambda: app().show_record(record_id))


HELD_STYLE = {"waiting": ("HELD", AMBER, DARK_TEXT), "in memory": ("HELD", AMBER, DARK_TEXT),
              "refused": ("SET ASIDE", RED, TEXT), "unreadable": ("SET ASIDE", RED, TEXT)}
"""A held verdict's chip: waiting for the log, or set aside for a person."""


HELD_ROWS = 200
"""History lists at most this many held verdicts (its notice counts them all)."""


def held_summary(held) -> str:
    """What a held verdict's row and record view say of it, after its judgement."""
    return {"waiting": "not in the audit log yet: written when the log works again",
            "in memory": "not in the audit log yet, and kept in memory only: lost if the app closes",
            "refused": "the audit log refused it as a record: a person must look at it",
            "unreadable": "its held file is damaged: a person must look at it"}[held.state]


def held_row(held, name: str) -> HistoryRow:
    """A verdict the log has not taken; tap it for the verdict with its photo."""
    word, colour, ink = HELD_STYLE[held.state]
    judged = (f"{decision_word(held.decision)} - {history_judgement(held)}" if held.verdict
              else history_judgement(held))
    key = held.key
    return HistoryRow((word, colour, ink), f"{name}  ({judged})",
                      f"{utc_stamp(held.judged_utc)} - {held_summary(held)}",
                      lambda: app().show_held(key))


class HistoryScreen(Screen):
    def __init__(self, **kw):
        super().__init__(name="history", **kw)
        root = BgBox(orientation="vertical", spacing=dp(8))
        back = Btn("< Products", bg=CARD)
        back.bind(on_release=lambda *_: app().go_picker())
        root.add_widget(header("Audit history", left=back))
        body = BoxLayout(orientation="vertical", padding=(dp(12), 0, dp(12), dp(8)), spacing=dp(8))
        self.chain = BgBox(size_hint_y=None, height=dp(64), padding=dp(8), bg=CARD)
        self.chain_label = Label(text="", font_size=FONT_SMALL, color=TEXT, halign="left",
                                 valign="middle")
        self.chain_label.bind(size=lambda w, *_: setattr(w, "text_size", w.size))
        self.chain.add_widget(self.chain_label)
        body.add_widget(self.chain)
        self.held = WrapLabel(text="", font_size=FONT_SMALL, color=AMBER)
        body.add_widget(self.held)
        view, self.grid = scroll_list()
        body.add_widget(view)
        self.status = WrapLabel(text="", font_size=FONT_SMALL, color=MUTED)
        body.add_widget(self.status)
        buttons = BoxLayout(size_hint_y=None, height=dp(56), spacing=dp(8))
        csv_b, json_b = Btn("Export CSV"), Btn("Export JSON")
        csv_b.bind(on_release=lambda *_: app().export("csv"))
        json_b.bind(on_release=lambda *_: app().export("json"))
        buttons.add_widget(csv_b)
        buttons.add_widget(json_b)
        body.add_widget(buttons)
        root.add_widget(body)
        self.add_widget(root)

    def show(self, records, report, error: str, names: dict, held=(), why_held: str = "",
             held_dir: str = "") -> None:
        """The log's records and chain check, after ``held``: the verdicts judged on this
        device that are not in the log (:class:`~auditlens.device_app.app.session.HeldVerdict`,
        newest first), those waiting (kept on the device, written when the log works
        again) and those set aside in ``held_dir`` for a person (the log refused them, or
        their file is damaged: no later capture writes them)."""
        set_aside = sum(h.set_aside for h in held)
        waiting = len(held) - set_aside
        lines = []
        if waiting:
            lines.append(f"{waiting} verdict{'s' if waiting != 1 else ''} not yet in the audit log "
                         f"(kept on this device, written when the log works again; listed first, "
                         f"marked HELD; not in exports)"
                         + (f": {why_held}" if why_held else ""))
        elif why_held:  # held verdicts that could not be listed
            lines.append(why_held[0].upper() + why_held[1:])
        if set_aside:
            one = set_aside == 1
            lines.append(f"{set_aside} held verdict{'' if one else 's'} could not be written to the "
                         f"audit log and {'was' if one else 'were'} set aside in {held_dir}: a person "
                         f"must look at {'it' if one else 'them'} (not in the log or exports)")
        self.held.text = "\n".join(lines)
        if error:  # the app's words: "AUDIT LOG TAMPERED: ..." only for a broken chain
            self.chain.bg = RED
            self.chain_label.text = error
        # the notes too: the app, not a person, chose from which record its key must have signed
        elif report.warnings or report.notes or not report.triggers_intact:  # or the file was opened by hand
            self.chain.bg = AMBER
            self.chain_label.color = DARK_TEXT
            self.chain_label.text = (f"Records verify ({report.records}), but: "
                                     + "; ".join(report.warnings + report.notes
                                                 or ("the append-only guards are missing",)))
            return self._rows(records, held, names)
        else:
            self.chain.bg = (0.10, 0.30, 0.18, 1)
            self.chain_label.text = (f"Hash chain intact: {report.records} records"
                                     + (f" (the newest {len(records)} listed; all are in the exports)"
                                        if len(records) < report.records else "")
                                     + f"\nhead {report.head_hash[:16]}...  log {report.log_id[:8]}")
        self.chain_label.color = TEXT
        self._rows(records, held, names)

    def _rows(self, records, held, names: dict) -> None:
        self.grid.clear_widgets()
        for h in held[:HELD_ROWS]:  # not in the log yet: above its newest record
            self.grid.add_widget(held_row(h, names.get(h.product_id, h.product_id)))
        for r in records:
            self.grid.add_widget(record_row(r, names.get(r.product_id, r.product_id)))
        if not records and not held:
            self.grid.add_widget(WrapLabel(text="No verifications yet.", color=MUTED))

    def exported(self, path) -> None:
        self.status.text = f"Exported to {path}"

    def export_failed(self, error) -> None:
        self.status.text = f"Export failed: {error}"


__all__ = [
    "BG", "CameraScreen", "HistoryScreen", "LoadingScreen", "PickerScreen", "RecordScreen",
    "RefusalScreen", "VerdictScreen",
]


class RecordScreen(Screen):
    """One audit record as the log keeps it: the stored photo beside the catalogue
    original, the verdict, and who, where, when and with which model and bundle."""

    def __init__(self, **kw):
        super().__init__(name="record", **kw)
        root = BgBox(orientation="vertical", spacing=dp(8))
        back = Btn("< History", bg=CARD)
        back.bind(on_release=lambda *_: app().show_history())
        self.bar = header("Record", left=back)
        root.add_widget(self.bar)
        self.body = ResponsiveBox(spacing=dp(10), padding=dp(10))
        pics, self.original, self.photo, self.photo_caption = side_by_side("Photo on record")
        self.body.add_widget(pics)
        view, self.details = scroll_list(spacing=8)
        self.body.add_widget(view)
        root.add_widget(self.body)
        self.add_widget(root)

    def show(self, record, photo, original, name: str) -> None:
        """A record of the log."""
        self._head(f"Record #{record.id}", record, photo, original, name, "Photo on record")
        for line in (f"{record.created_utc} - auditor {record.auditor or '(none)'} - device "
                     f"{record.device or '(none)'}",
                     f"model {record.model_id[:16]} - bundle {str(record.verdict_value('bundle_id', '?'))[:16]}",
                     f"photo sha256 {record.photo_sha256[:16]}... - record hash {record.record_hash[:16]}..."
                     + (f" - signed by {record.signer}" if record.signer else "")):
            self.details.add_widget(WrapLabel(text=line, font_size=FONT_SMALL, color=MUTED))
        if photo is None:
            self.details.add_widget(WrapLabel(
                text="The stored photo cannot be shown (its bytes are kept as they came; "
                     "verify-log --export-photos exports them).", font_size=FONT_SMALL, color=AMBER))

    def show_held(self, held, photo, original, name: str, where: str) -> None:
        """A verdict not in the log (a :class:`~auditlens.device_app.app.session.HeldVerdict`),
        kept ``where`` (its file, or "memory")."""
        self._head(HELD_STYLE[held.state][0].capitalize(), held, photo, original, name,
                   "Photo held on this device")
        d = self.details
        summary = held_summary(held)
        d.add_widget(WrapLabel(text=summary[0].upper() + summary[1:] + ".", font_size=FONT,
                               color=RED if held.set_aside else AMBER))
        v = held.verdict
        for line in (f"judged {held.judged_utc or '?'} - auditor {held.auditor or '(none)'}",
                     f"model {str(v.get('model_id', '?'))[:16]} - bundle {str(v.get('bundle_id', '?'))[:16]}",
                     f"photo sha256 {str(v.get('photo_sha256', '?'))[:16]}... - kept in {where}"):
            d.add_widget(WrapLabel(text=line, font_size=FONT_SMALL, color=MUTED))
        if photo is None:
            d.add_widget(WrapLabel(text="The held photo cannot be shown: its bytes do not decode.",
                                   font_size=FONT_SMALL, color=AMBER))

    def _head(self, title: str, item, photo, original, name: str, caption: str) -> None:
        """The title, the two pictures, the product and the judgement of a record or a
        held verdict (both carry decision, product id, score, threshold and reasons)."""
        word = decision_word(item.decision)
        self.bar.title_label.text = f"{title}: {word}"
        self.photo_caption.text = caption
        self.original.texture = pil_to_texture(original) if original is not None else None
        self.photo.texture = pil_to_texture(photo) if photo is not None else None
        d = self.details
        d.clear_widgets()
        d.add_widget(WrapLabel(text=f"{name}  ({item.product_id})", font_size=FONT_BIG, bold=True))
        d.add_widget(WrapLabel(text=f"{word} - {history_judgement(item)}", font_size=FONT, bold=True))
        for reason in item.reasons if item.decision == "retake" else ():  # why not judged, in full
            d.add_widget(WrapLabel(text=f"- {reason}", font_size=FONT))
