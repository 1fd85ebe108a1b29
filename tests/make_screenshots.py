"""Drive the real field app headless and save a screenshot of every screen.

    python tests/make_screenshots.py                       # -> docs/screenshots/
    python tests/make_screenshots.py --out /tmp/shots --size 720x1280

Each run starts the app in a fresh process (Kivy's window is per process) with
``SDL_VIDEODRIVER=offscreen`` (no display needed: Kivy renders through Mesa), plays a
folder of photos as the camera, and walks the auditor's path: picker, camera with the
framing guide, a MATCH, a NO MATCH with suggestions, a RETAKE, the history, and a CSV
export. It writes ``result.json`` (verdicts, record ids, export path) beside the PNGs;
``tests/test_app.py`` runs it and checks that against the audit log.

The catalogue is generated (packaging-like artwork: distinct colours, stripes, badges
and words) so the script and the tests need nothing outside the repository; photos are
the products re-drawn as a phone would see them (background clutter, rotation, scale,
light, blur, noise, JPEG).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

REPO = Path(__file__).resolve().parents[1]
PROVISIONAL_MODEL = Path("/tmp/scratch/enc.tflite")

PRODUCTS = [
    # id, name, group, code, background, accent, pattern, word
    ("oat-milk-1l", "Oat Drink 1 L", "Milk", "7310001000017", (236, 222, 180), (120, 80, 30), "waves", "OAT"),
    ("whole-milk-1l", "Whole Milk 1 L", "Milk", "7310001000024", (40, 90, 200), (250, 250, 250), "stripes", "MILK"),
    ("orange-juice-1l", "Orange Juice 1 L", "Juice", "7310001000031", (250, 150, 20), (30, 140, 40), "circles", "JUICE"),
    ("tomato-soup", "Tomato Soup 400 g", "Soup", "7310001000048", (200, 30, 30), (255, 240, 200), "band", "SOUP"),
    ("green-tea-20", "Green Tea 20 bags", "Tea", "7310001000055", (40, 150, 80), (250, 230, 120), "checks", "TEA"),
    ("dark-coffee-500", "Dark Roast Coffee 500 g", "Coffee", "7310001000062", (50, 35, 30), (220, 170, 90), "diagonal", "COFFEE"),
    ("lemon-soda-33", "Lemon Soda 33 cl", "Soda", "7310001000079", (245, 235, 60), (20, 120, 200), "dots", "LEMON"),
    ("plain-yogurt-500", "Plain Yogurt 500 g", "Yogurt", "7310001000086", (245, 245, 250), (60, 110, 200), "band", "YOGURT"),
]


def _font(size: int):
    for name in ("DejaVuSans-Bold.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    try:
        return ImageFont.load_default(size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def draw_product(spec, side: int = 480) -> Image.Image:
    """The product's packaging as a catalogue original (on white)."""
    _, name, _, _, bg, accent, pattern, word = spec
    im = Image.new("RGB", (side, side), (255, 255, 255))
    d = ImageDraw.Draw(im)
    x0, y0, x1, y1 = int(side * 0.2), int(side * 0.06), int(side * 0.8), int(side * 0.94)
    d.rectangle((x0, y0, x1, y1), fill=bg)
    w, h = x1 - x0, y1 - y0
    if pattern == "stripes":
        for i in range(0, h, 36):
            d.rectangle((x0, y0 + i, x1, y0 + i + 14), fill=accent)
    elif pattern == "circles":
        for r in range(w // 2, 10, -28):
            d.ellipse((x0 + w / 2 - r, y0 + h * 0.35 - r, x0 + w / 2 + r, y0 + h * 0.35 + r),
                      outline=accent, width=10)
    elif pattern == "band":
        d.rectangle((x0, y0 + h * 0.3, x1, y0 + h * 0.55), fill=accent)
    elif pattern == "checks":
        s = 40
        for i in range(0, w, s):
            for j in range(0, int(h * 0.5), s):
                if (i // s + j // s) % 2:
                    d.rectangle((x0 + i, y0 + j, x0 + i + s, y0 + j + s), fill=accent)
    elif pattern == "diagonal":
        for i in range(-h, w, 40):
            d.line((x0 + i, y1, x0 + i + h, y0), fill=accent, width=14)
    elif pattern == "dots":
        for i in range(20, w, 50):
            for j in range(20, h, 50):
                d.ellipse((x0 + i - 12, y0 + j - 12, x0 + i + 12, y0 + j + 12), fill=accent)
    elif pattern == "waves":
        for j in range(30, h, 45):
            pts = [(x0 + t, y0 + j + 12 * np.sin(t / 18)) for t in range(0, w, 4)]
            d.line(pts, fill=accent, width=8)
    font = _font(int(side * 0.09))
    box = d.textbbox((0, 0), word, font=font)
    tw, th = box[2] - box[0], box[3] - box[1]
    tx, ty = x0 + (w - tw) / 2, y0 + h * 0.72
    d.rectangle((tx - 10, ty - 8, tx + tw + 10, ty + th + 16), fill=(255, 255, 255))
    d.text((tx, ty), word, fill=accent if sum(accent) < 600 else (30, 30, 30), font=font)
    return im


def photograph(original: Image.Image, seed: int, *, side: int = 1024, dark: bool = False) -> bytes:
    """The product as a phone photographs it: on a shelf-like cluttered background,
    rotated, scaled, shifted, re-lit, slightly blurred, noisy, JPEG-compressed."""
    rng = np.random.default_rng(seed)
    base = rng.integers(60, 200, size=(12, 12, 3)).astype(np.uint8)
    bg = Image.fromarray(base).resize((side, side), Image.Resampling.BICUBIC)
    bg = bg.filter(ImageFilter.GaussianBlur(6))
    product = original.convert("RGB")
    mask = Image.fromarray((np.asarray(product).min(axis=2) < 245).astype(np.uint8) * 255)
    scale = rng.uniform(0.85, 1.0) * side / product.width
    size = (int(product.width * scale), int(product.height * scale))
    angle = rng.uniform(-7, 7)
    product = product.resize(size, Image.Resampling.BICUBIC).rotate(angle, expand=True)
    mask = mask.resize(size, Image.Resampling.BILINEAR).rotate(angle, expand=True)
    ox = int((side - product.width) / 2 + rng.integers(-30, 30))
    oy = int((side - product.height) / 2 + rng.integers(-30, 30))
    bg.paste(product, (ox, oy), mask)
    arr = np.asarray(bg).astype(np.float32)
    gain = rng.uniform(0.85, 1.1, size=3) * (0.12 if dark else 1.0)
    arr = arr * gain + rng.normal(0, 4, arr.shape)
    photo = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.8))
    out = io.BytesIO()
    photo.save(out, "JPEG", quality=88)
    return out.getvalue()


def find_model() -> Path:
    """The shipped encoder when it exists, else the provisional int8 model."""
    for candidate in (REPO / "models" / "encoder.tflite", PROVISIONAL_MODEL):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError("no encoder: neither models/encoder.tflite nor /tmp/scratch/enc.tflite")


SAMPLE = REPO / "models" / "sample"


def darken(data: bytes, factor: float = 0.15) -> bytes:
    """A photo taken with too little light (the quality check must send it back)."""
    im = Image.open(io.BytesIO(data)).convert("RGB")
    arr = np.asarray(im).astype(np.float32) * factor
    out = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(out, "JPEG", quality=90)
    return out.getvalue()


def _synthetic(root: Path) -> tuple[Path, dict[str, tuple[bytes, str]]]:
    """A generated catalogue and photos: (catalog.csv, {photo name: (bytes, product id)})."""
    catalog_dir = root / "catalog"
    catalog_dir.mkdir(parents=True, exist_ok=True)
    rows = ["product_id,image,name,group,kind,code"]
    photos = {}
    for i, spec in enumerate(PRODUCTS):
        pid, name, group, code = spec[:4]
        im = draw_product(spec)
        im.save(catalog_dir / f"{pid}.png")
        rows.append(f"{pid},{catalog_dir / (pid + '.png')},{name},{group},Packages,{code}")
        photos[f"{pid}_001.jpg"] = (photograph(im, 2 * i + 1), pid)
        photos[f"{pid}_002.jpg"] = (photograph(im, 2 * i + 2), pid)
    (root / "catalog.csv").write_text("\n".join(rows) + "\n")
    return root / "catalog.csv", photos


def _sample() -> tuple[Path, dict[str, tuple[bytes, str]]]:
    """The shipped sample catalogue and its labelled field photos."""
    import csv

    photos = {}
    with open(SAMPLE / "photos.csv", newline="") as f:
        for row in csv.DictReader(f):
            path = SAMPLE / row["photo"]
            photos[path.name] = (path.read_bytes(), row["product_id"])
    return SAMPLE / "catalog.csv", photos


def make_demo(root: Path, model: Path | None = None, source: str = "auto") -> dict:
    """Enrol a catalogue (the shipped sample when present, else a generated one) into a
    bundle under ``root`` and choose the photos the app is driven with: a product A, a
    photo of A, a photo of another product, and a too-dark photo of A.

    The bundle keeps the threshold it enrols with (the model card's calibrated one) when a
    pair of photos is told apart by it; otherwise its threshold is set between A's genuine
    score and the other photo's score *on these photos* (so the walk-through shows each
    screen whatever model is shipped): a demonstration, not a calibration.
    """
    from auditlens.catalog import open_catalog
    from auditlens.device_app.verifier import Verifier
    from auditlens.export.enroll import EnrollOptions, enroll

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    model = Path(model or find_model())
    shutil.copy(model, root / "model.tflite")
    card = model.with_suffix(".json")
    if card.is_file():
        shutil.copy(card, root / "model.json")
    if source == "auto":
        source = "sample" if (SAMPLE / "photos.csv").is_file() else "synthetic"
    catalog_csv, photos = _sample() if source == "sample" else _synthetic(root)
    catalog = open_catalog(catalog_csv)

    bundle0 = enroll(catalog, root / "bundle0", model=root / "model.tflite",
                     options=EnrollOptions(progress=False))
    verifier = Verifier(bundle0)
    ids = [p.product_id for p in verifier.bundle.products]
    kinds = {p.product_id: p.kind for p in verifier.bundle.products}
    names = list(photos)
    captures = [verifier.prepare(photos[n][0]) for n in names]
    scores = np.array([verifier.product_scores(verifier.embed(c), c.cells) for c in captures])  # (photos, products)
    calibrated = verifier.threshold
    best = None
    for a_i, a in enumerate(ids):
        genuine = [k for k, n in enumerate(names) if photos[n][1] == a]
        others = [k for k, n in enumerate(names) if photos[n][1] != a]
        for g in genuine:
            for o in others:
                own = ids.index(photos[names[o]][1])
                margin = scores[g, a_i] - scores[o, a_i]
                # prefer packaged products, and an impostor photo whose own product ranks first
                told_apart = scores[g, a_i] >= calibrated > scores[o, a_i]
                key = (told_apart, kinds.get(a) == "Packages", kinds.get(photos[names[o]][1]) == kinds.get(a),
                       bool(np.argmax(scores[o]) == own), margin)
                if margin > 0 and (best is None or key > best[0]):
                    best = (key, a, g, o)
    if best is None:
        raise RuntimeError(f"no photo pair separates any product with model {model}")
    key, product, g, o = best
    a_i = ids.index(product)
    if key[0]:
        threshold = calibrated
        (root / "bundle0").rename(root / "bundle")
        bundle = root / "bundle"
    else:
        threshold = round(float((scores[g, a_i] + scores[o, a_i]) / 2), 4)
        shutil.rmtree(root / "bundle0")
        bundle = enroll(catalog, root / "bundle", model=root / "model.tflite",
                        options=EnrollOptions(progress=False, threshold=threshold))

    camera_dir = root / "camera"
    camera_dir.mkdir(exist_ok=True)
    match_photo = f"1-{names[g]}"
    mismatch_photo = f"2-{names[o]}"
    retake_photo = f"3-{Path(names[g]).stem}-dark.jpg"
    (camera_dir / match_photo).write_bytes(photos[names[g]][0])
    (camera_dir / mismatch_photo).write_bytes(photos[names[o]][0])
    (camera_dir / retake_photo).write_bytes(darken(photos[names[g]][0]))
    plan = {
        "source": source, "model": str(model), "bundle": str(bundle), "camera_dir": str(camera_dir),
        "product": product, "threshold": threshold, "threshold_calibrated": bool(key[0]),
        "match_photo": match_photo, "match_score": float(scores[g, a_i]),
        "mismatch_photo": mismatch_photo, "mismatch_product": photos[names[o]][1],
        "mismatch_score": float(scores[o, a_i]), "retake_photo": retake_photo,
        "search": "milk",
    }
    (root / "plan.json").write_text(json.dumps(plan, indent=2))
    return plan


# -- the in-app driver (runs inside the app's process) ---------------------------------------
def drive(plan_json: str, log: str, out: str, size: str, auditor: str) -> None:
    """Run the app and walk through every screen, saving screenshots and result.json."""
    plan = json.loads(Path(plan_json).read_text())
    bundle, camera_dir, product = plan["bundle"], plan["camera_dir"], plan["product"]
    from auditlens.device_app.app.main import build_app_class, configure_kivy

    configure_kivy(size)
    from kivy.clock import Clock
    from kivy.core.window import Window
    from kivy.uix.label import Label

    from auditlens.device_app.app.widgets import ACCENT

    AuditApp = build_app_class()
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = "phone" if int(size.split("x")[1]) > int(size.split("x")[0]) else "tablet"
    app = AuditApp(bundle=Path(bundle),
                   camera_dir=None if plan.get("mode") == "no_camera" else Path(camera_dir),
                   log=Path(log),
                   auditor=auditor, device="test-device", export_dir=out_dir)
    result: dict = {"size": size, "screens": {}, "verdicts": [], "errors": []}

    def shot(name: str):
        path = out_dir / f"{tag}-{name}.png"
        made = Window.screenshot(name=str(out_dir / f"_{name}.png"))
        os.replace(made, path)
        result["screens"][name] = {"file": str(path), "screen": app.sm.current}

    def verdict_of():
        o = app.last_outcome
        v = o.verdict
        screen = app.screens["verdict"]
        return {"primary": "next" if list(screen.next_button.background_color) == list(ACCENT) else "retake",
                "texts": [w.text for w in screen.details.children[::-1] if hasattr(w, "text")],
                "decision": v.decision if v else None, "score": v.score if v else None,
                "threshold": v.threshold if v else None, "record_id": o.record_id,
                "suggestions": [c.product_id for c in v.suggestions] if v else [],
                "reasons": list(v.reasons) if v else [o.error], "product_id": o.product_id,
                "seconds": o.seconds, "photo": app.camera.current.name}

    steps = []
    state = {"i": 0, "settle": 0, "t0": time.monotonic()}

    def step(fn):
        steps.append(fn)
        return fn

    if plan.get("mode") == "no_camera":
        @step
        def pick_without_camera():
            app.select_product(product)

        @step
        def no_camera():
            result["no_camera"] = {"screen": app.sm.current, "camera": repr(app.camera),
                                   "capture_disabled": app.screens["camera"].capture.disabled,
                                   "capture_returned": app.capture()}
            shot("2b-no-camera")
    elif plan.get("mode") == "scan":
        @step
        def scan():
            assert app.sm.current == "picker"
            result["scan_button_enabled"] = not app.screens["picker"].scan.disabled
            app.start_scan()
            state["scan_started"] = time.monotonic()

        @step
        def scanned():
            # the analyser runs every ANALYSE_EVERY_S on the worker; wait for it to find the code
            if app.product_id is None and time.monotonic() - state["scan_started"] < 10:
                state["i"] -= 1  # not yet: run this step again
                return
            result["scan"] = {"screen": app.sm.current, "product_id": app.product_id,
                              "scanning": app.scanning,
                              "hint": app.screens["camera"].hint.text}
    elif plan.get("mode") == "held":  # the log stops taking records, then works again
        @step
        def capture_unlogged():
            def disk_full(*_a, **_k):
                raise sqlite3.OperationalError("database or disk is full")

            app.session.log.append = disk_full
            app.select_product(product)
            app.camera.select(plan["match_photo"])
            assert app.capture()

        @step
        def history_with_held():
            result["held"] = {"log_error": app.last_outcome.log_error, "decision": verdict_of()["decision"]}
            app.show_history()

        def listed():  # History's rows, top first: (chip, first line, second line)
            rows = list(reversed(app.screens["history"].grid.children))
            return [[lab.text for lab in row.walk(restrict=True) if isinstance(lab, Label)] for row in rows]

        def record_view():
            screen = app.screens["record"]
            return {"screen": app.sm.current, "title": screen.bar.title_label.text,
                    "photo_shown": screen.photo.texture is not None,
                    "original_shown": screen.original.texture is not None,
                    "caption": screen.photo_caption.text,
                    "details": [w.text for w in reversed(screen.details.children)]}

        @step
        def held_shown():
            screen = app.screens["history"]
            result["held"].update(screen=app.sm.current, label=screen.held.text, height=screen.held.height,
                                  rows=len(app.session.history()), listed=listed())
            (held_file,) = app.session.held_dir.glob("*.json")
            state["held_file"] = held_file.read_bytes()  # set aside below, as a refused copy
            shot("6a-history-held")
            screen.grid.children[-1].dispatch("on_release")  # the auditor taps the held verdict

        @step
        def held_opened():
            result["held"]["view"] = record_view()
            shot("6b-held-verdict")
            del app.session.log.append  # the disk has room again
            (held,) = app.session.held_verdicts()
            app.session.write_held()  # the log takes it (as a capture would)...
            app.show_held(held.key)  # ...while History still lists it: tapped again

        @step
        def held_gone():
            result["held"]["status_gone"] = app.screens["history"].status.text
            app.show_history()

        @step
        def held_written():
            result["held"].update(label_after=app.screens["history"].held.text,
                                  height_after=app.screens["history"].held.height,
                                  rows_after=len(app.session.history()), waiting_after=app.session.held())
            # a held verdict the log refused as a record: set aside on disk for a person
            app.session.held_dir.mkdir(exist_ok=True)
            (app.session.held_dir / "00000000000000000001-refused.refused").write_bytes(state["held_file"])
            app.show_history()

        @step
        def set_aside_shown():
            result["held"].update(label_set_aside=app.screens["history"].held.text, listed_set_aside=listed())
            app.screens["history"].grid.children[-1].dispatch("on_release")

        @step
        def set_aside_opened():
            result["held"]["view_set_aside"] = record_view()
    elif plan.get("mode") == "back_key":  # Android's Back key from each screen
        @step
        def back_from_camera():
            app.select_product(product)
            result["back"] = {"from_camera": (app.sm.current, app.on_back_key(None, 27), app.sm.current)}
            result["back"]["other_key"] = app.on_back_key(None, 13)
            result["back"]["from_picker"] = (app.sm.current, app.on_back_key(None, 27), app.sm.current)
    elif plan.get("mode") == "moved_on":  # History asked for, then a product picked at once
        @step
        def history_then_product():
            app.show_history()
            app.select_product(product)

        @step
        def where():
            result["moved_on"] = {"screen": app.sm.current}
    elif plan.get("mode") == "no_auditor":  # capture before a name is typed, then after
        @step
        def nameless():
            app.set_auditor("")
            app.select_product(product)
            app.camera.select(plan["match_photo"])
            result["no_auditor"] = {"capture_returned": app.capture(),
                                    "hint": app.screens["camera"].hint.text}
            box = app.screens["picker"].auditor
            box.focus = True  # typed into the name box, which then loses focus
            box.text = "Sam Field"
            box.focus = False
            result["no_auditor"]["capture_after"] = app.capture()

        @step
        def named():
            result["no_auditor"].update(records=len(app.session.history()),
                                        auditor=app.session.history()[0].auditor)
    elif plan.get("mode") == "guide":  # where the framing guide sits over the photo
        @step
        def pick():
            app.select_product(product)
            app.camera.select(plan["match_photo"])
            app.screens["camera"].show_files(app.camera)

        @step
        def measure():
            guide = app.screens["camera"].guide
            result["guide"] = {"rect": list(guide.guide_rect()), "image": list(guide.image_rect()),
                               "crop": app.session.bundle.spec.crop,
                               "zoom": app.session.bundle.spec.photo_zooms[0]}
            app.step_camera(1)  # the next file cannot be decoded

        @step
        def broken():
            screen = app.screens["camera"]
            result["broken"] = {"texture": screen.preview.texture, "label": screen.file_label.text}
    elif plan.get("expect_refusal"):
        @step
        def refused():
            result["load_error"] = f"{type(app.load_error).__name__}: {app.load_error}"
            result["refusal_title"] = app.screens["refusal"].title.text
            result["back_closes"] = not app.on_back_key(None, 27)  # Back may leave a refused app
            shot("0-refused")
    else:
        @step
        def loaded():
            assert app.sm.current == "picker", f"app did not load: {app.sm.current} {app.load_error}"
            shot("1-picker")

    def step_unless_refusal(fn):
        return fn if plan.get("expect_refusal") or plan.get("mode") else step(fn)

    @step_unless_refusal
    def search():
        app.screens["picker"].search.text = plan["search"]

    @step_unless_refusal
    def searched():
        shot("1b-picker-search")
        result["search"] = [r.product_id for r in app.screens["picker"].grid.children][::-1]
        app.screens["picker"].search.text = ""
        app.select_product(product)
        app.camera.select(plan["match_photo"])
        app.screens["camera"].show_files(app.camera)

    @step_unless_refusal
    def camera():
        assert app.sm.current == "camera"
        shot("2-camera")
        guide = app.screens["camera"].guide
        result["guide"] = {"rect": list(guide.guide_rect()), "image": list(guide.image_rect())}
        assert app.capture()

    @step_unless_refusal
    def match():
        assert app.sm.current == "verdict", app.sm.current
        result["verdicts"].append(verdict_of())
        shot("3-match")
        app.go_camera()
        app.camera.select(plan["mismatch_photo"])
        app.screens["camera"].show_files(app.camera)
        assert app.capture()

    @step_unless_refusal
    def no_match():
        result["verdicts"].append(verdict_of())
        shot("4-no-match")
        app.go_camera()
        app.camera.select(plan["retake_photo"])
        app.screens["camera"].show_files(app.camera)
        assert app.capture()

    @step_unless_refusal
    def retake():
        result["verdicts"].append(verdict_of())
        shot("5-retake")
        app.show_history()

    @step_unless_refusal
    def history():
        assert app.sm.current == "history"
        app.export("csv")

    @step_unless_refusal
    def exported():
        result["export_csv"] = str(app.last_export)
        shot("6-history")
        result["history_rows"] = len(app.screens["history"].grid.children)
        result["history_texts"] = [[label.text for label in row.children[0].children[::-1]]
                                   for row in app.screens["history"].grid.children[::-1]]
        app.show_record(2)  # a tap on the NO MATCH row

    @step_unless_refusal
    def record():
        screen = app.screens["record"]
        result["record"] = {"screen": app.sm.current, "title": screen.bar.title_label.text,
                            "texts": [w.text for w in screen.details.children[::-1] if hasattr(w, "text")],
                            "photo_shown": screen.photo.texture is not None}
        shot("7-record")
        result["record"]["back"] = app.on_back_key(None, 27)

    @step_unless_refusal
    def back_to_history():
        result["record"]["after_back"] = app.sm.current
        result["chain_label"] = app.screens["history"].chain_label.text

    def tick(_dt):
        if time.monotonic() - state["t0"] > 120:
            result["errors"].append("timed out")
            return finish()
        if app.worker is None or app.busy:
            state["settle"] = 0
            return
        state["settle"] += 1
        if state["settle"] < 4:  # let a few frames render after the last change
            return
        state["settle"] = 0
        if state["i"] >= len(steps):
            return finish()
        fn = steps[state["i"]]
        state["i"] += 1
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - reported in result.json
            import traceback

            result["errors"].append(f"{fn.__name__}: {exc!r}\n{traceback.format_exc()}")
            finish()

    def finish():
        (out_dir / f"result-{tag}.json").write_text(json.dumps(result, indent=2, default=str))
        app.stop()

    Clock.schedule_interval(tick, 0.1)
    app.run()


def run_app_headless(plan_json, log, out, size, auditor="Test Auditor",
                     timeout: float = 180, extra_env: dict | None = None) -> dict:
    """Run :func:`drive` in a fresh process with Kivy offscreen; return its result."""
    Path(out).mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update({"KIVY_NO_ARGS": "1", "SDL_VIDEODRIVER": "offscreen",
                "KIVY_HOME": str(Path(out) / ".kivy")})
    env.update(extra_env or {})
    here = str(Path(__file__).parent)
    code = f"import sys; sys.path.insert(0, {here!r}); import make_screenshots as m; m.drive(*sys.argv[1:])"
    proc = subprocess.run([sys.executable, "-c", code, str(plan_json), str(log),
                           str(out), size, auditor], env=env, capture_output=True, text=True,
                          timeout=timeout)
    tag = "phone" if int(size.split("x")[1]) > int(size.split("x")[0]) else "tablet"
    path = Path(out) / f"result-{tag}.json"
    if not path.is_file():
        raise RuntimeError(f"the app run failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    result = json.loads(path.read_text())
    result["returncode"] = proc.returncode
    result["stderr_tail"] = proc.stderr[-3000:]
    return result


def compact_png(src: Path, dst: Path) -> None:
    """Save a screenshot for the docs at a fraction of the size (256-colour PNG)."""
    im = Image.open(src).convert("RGB")
    im.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.FLOYDSTEINBERG) \
        .save(dst, optimize=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "docs" / "screenshots")
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir)")
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--source", choices=("auto", "sample", "synthetic"), default="auto")
    p.add_argument("--size", action="append", default=None,
                   help="WxH, repeatable (default: 720x1280 and 1280x800)")
    args = p.parse_args(argv)
    import tempfile

    work = args.work or Path(tempfile.mkdtemp(prefix="auditlens-shots-"))
    demo = make_demo(work, args.model, args.source)
    print(json.dumps(demo, indent=2))
    args.out.mkdir(parents=True, exist_ok=True)
    for size in args.size or ["720x1280", "1280x800"]:
        log = work / f"audit-{size}.db"
        result = run_app_headless(work / "plan.json", log, work / f"run-{size}", size)
        for name, info in result["screens"].items():
            if name.startswith("1b"):
                continue
            compact_png(Path(info["file"]), args.out / Path(info["file"]).name)
        print(size, json.dumps({k: result[k] for k in ("verdicts", "errors")}, indent=1))
        if result["errors"]:
            return 1
    # History with a verdict the log could not take, and that verdict opened
    (work / "plan-held.json").write_text(json.dumps(dict(demo, mode="held")))
    for size in args.size or ["720x1280", "1280x800"]:
        result = run_app_headless(work / "plan-held.json", work / f"held-{size}.db", work / f"held-{size}", size)
        for info in result["screens"].values():
            compact_png(Path(info["file"]), args.out / Path(info["file"]).name)
        if result["errors"]:
            return 1
    # the refusal screen: the same bundle with one byte of its latents flipped
    bad = work / "bundle-tampered"
    shutil.rmtree(bad, ignore_errors=True)
    shutil.copytree(demo["bundle"], bad)
    refs = bad / "references.npy"
    data = bytearray(refs.read_bytes())
    data[-3] ^= 0xFF
    refs.write_bytes(bytes(data))
    (work / "plan-tampered.json").write_text(json.dumps(dict(demo, bundle=str(bad), expect_refusal=True)))
    for size in args.size or ["720x1280", "1280x800"]:
        result = run_app_headless(work / "plan-tampered.json", work / "refused.db",
                                  work / f"refused-{size}", size)
        for info in result["screens"].values():
            compact_png(Path(info["file"]), args.out / Path(info["file"]).name)
        print(size, result.get("load_error"), result["errors"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
