"""Latency of auditlens on the device path: encoder inference (int8 vs float32, 1 and 2
threads), preprocessing, decoding with and without JPEG draft (reduced) decoding, and the
whole ``Verifier.verify`` of phone-sized JPEGs, with a per-stage breakdown.

Every pair of rows whose ratio the report gives is timed in alternation
(:func:`~.common.measure_interleaved`), so a shared machine's drifting load falls on both
alike."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from auditlens.device_app.imaging import load_image
from auditlens.device_app.interpreter import Encoder, EncoderOptions
from auditlens.device_app.nearcopy import dhash, trimmed_hashes
from auditlens.device_app.preprocess import PreprocessSpec, to_model_input, to_photo_views
from auditlens.device_app.quality import analysis_copy, assess
from auditlens.device_app.verifier import Verifier, VerifierOptions

from .common import Timing, measure, measure_interleaved

PHONE_SIZES = {"1 MP": (1152, 864), "12 MP": (4032, 3024)}
"""4:3 frames as phone cameras write them."""


SENSOR_NOISE = 6.0
"""Standard deviation (grey levels) of the noise added to the upscaled photo: an upscale
alone is smooth and compresses to a fifth of a real phone JPEG, and a JPEG decoder's time
grows with the detail it has to entropy-decode."""


def make_phone_jpeg(photo: str | Path, size: tuple[int, int], out: Path) -> Path:
    """Upscale a real photo to a phone-sized 4:3 frame (square upscale, centre crop), add
    sensor-like noise and save it as a quality-90 JPEG (4:2:0 chroma, as phones write
    them): about 3 MB at 12 MP, the size of a phone's own JPEG of a shelf."""
    image = load_image(photo)
    w, h = size
    side = max(w, h)
    big = image.resize((side, side), Image.Resampling.BICUBIC)
    left, top = (side - w) // 2, (side - h) // 2
    frame = np.asarray(big.crop((left, top, left + w, top + h)), np.float32)
    frame += np.random.default_rng(0).normal(0.0, SENSOR_NOISE, frame.shape).astype(np.float32)
    Image.fromarray(np.clip(frame, 0, 255).round().astype(np.uint8)).save(out, "JPEG", quality=90, subsampling=2)
    return out


def make_phone_jpegs(photo: str | Path, workdir: Path) -> dict[str, Path]:
    """:func:`make_phone_jpeg` at every size of :data:`PHONE_SIZES`."""
    return {label: make_phone_jpeg(photo, size, workdir / f"phone_{label.replace(' ', '')}.jpg")
            for label, size in PHONE_SIZES.items()}


class _FullDecodeSpec(PreprocessSpec):
    """The bundle's preprocessing with JPEG draft decoding switched off (full decode)."""

    @property
    def draft_size(self):  # type: ignore[override]
        return None


@dataclass
class LatencyRow:
    what: str
    timing: Timing
    note: str = ""

    def to_dict(self) -> dict:
        return {"what": self.what, **self.timing.to_dict(), "note": self.note}


def encoder_latency(models: dict[str, Path], runs: int, log=print) -> list[LatencyRow]:
    """Inference of one image, for each model and 1 / 2 interpreter threads, all in
    alternation (float32 / int8 and 1 / 2 threads are ratios of these rows)."""
    variants = []
    for label, path in models.items():
        for threads in (1, 2):
            enc = Encoder(path, EncoderOptions(num_threads=threads))
            image = np.random.default_rng(0).integers(0, 256, (enc.input_size, enc.input_size, 3), dtype=np.uint8)
            variants.append((label, path, threads, enc, image))
    timings = measure_interleaved([lambda enc=enc, image=image: enc.raw_latents(image)
                                   for _, _, _, enc, image in variants], runs, warmup=10)
    rows = []
    for (label, path, threads, enc, _), t in zip(variants, timings):
        size_kib = Path(path).stat().st_size / 1024
        rows.append(LatencyRow(f"encoder {label}, {threads} thread{'s' if threads > 1 else ''}", t,
                               f"{enc.input_size}px -> {enc.latent_dim}-d, {enc.input_dtype} input, "
                               f"model {size_kib:.0f} KiB; in alternation"))
        log(f"  {rows[-1].what:40s} {t.cell(3)} ms")
    return rows


def score_stage(verifier: Verifier) -> str:
    """What a verify's score step does for this bundle, as its row names it."""
    terms = ["best reference's cosine"]
    if verifier.cells_weight:
        terms.append("+ cell term (the product's and the cohort's cells)")
    if verifier.rival_weight:
        terms.append("- rival term (the best other product)")
    return f"score: {' '.join(terms)}"


def second_look_latency(verifier: Verifier, photo: Path, product_id: str, runs: int) -> list[LatencyRow]:
    """A verify that takes the bundle's second look against one that takes none, in
    alternation: what the photos whose first score lands near the threshold pay."""
    options = VerifierOptions(num_threads=1)
    always = Verifier(verifier.bundle, options)
    always.second_look = replace(verifier.bundle.second_look, band=2.0)  # every first score is near
    never = Verifier(verifier.bundle, replace(options, second_look=False))
    if always.verify(photo, product_id).first_score is None:  # a RETAKE is not looked at twice
        raise RuntimeError(f"{photo} is sent back for a retake: no second look to time")
    t_look, t_first = measure_interleaved([lambda: always.verify(photo, product_id),
                                           lambda: never.verify(photo, product_id)], runs, warmup=1)
    views = verifier.spec.num_views
    return [LatencyRow("verify 1 MP JPEG, second look taken", t_look,
                       f"first score near the threshold: {5 * views} views instead of {views}"),
            LatencyRow("verify 1 MP JPEG, first look only", t_first, "in alternation with the row above")]


def verify_latency(bundle_path: Path, photo: str | Path, product_id: str, phones: dict[str, Path],
                   runs: int, runs_12mp_full: int, log=print) -> tuple[list[LatencyRow], dict]:
    """Whole verify of the phone JPEGs (:func:`make_phone_jpegs` of ``photo``) with draft vs
    full decoding, preprocessing, decoding and the per-stage breakdown of a 12 MP verify.
    Draft and full decoding of a 12 MP JPEG are timed ``runs_12mp_full`` times each (a full
    decode is slow), everything else ``runs`` times."""
    # the first look alone: what most photos cost (a second look near the threshold: its own rows)
    verifier = Verifier(bundle_path, VerifierOptions(num_threads=1, second_look=False))
    full = Verifier(verifier.bundle, VerifierOptions(num_threads=1, second_look=False))
    full.spec = _FullDecodeSpec(**verifier.spec.to_dict())
    spec = verifier.spec
    rows: list[LatencyRow] = []
    files: dict[str, Path] = {}
    ratios: dict[str, float] = {}
    for label, path in phones.items():
        size = PHONE_SIZES[label]
        files[label] = path
        data = path.read_bytes()
        n = runs if label == "1 MP" else runs_12mp_full
        kib = len(data) / 1024
        t_draft, t_full = measure_interleaved([lambda p=path: verifier.verify(p, product_id),
                                               lambda p=path: full.verify(p, product_id)], n, warmup=1)
        rows.append(LatencyRow(f"verify {label} JPEG, draft decode (engine)", t_draft,
                               f"{size[0]}x{size[1]}, {kib:.0f} KiB, decode+resize+infer+score+checks"))
        rows.append(LatencyRow(f"verify {label} JPEG, full decode", t_full,
                               "same verify, draft off; in alternation with the row above"))
        ratios[f"verify {label}: full / draft"] = t_full.median / t_draft.median
        d_draft, d_full = measure_interleaved([lambda data=data: load_image(io.BytesIO(data), draft=spec.draft_size),
                                               lambda data=data: load_image(io.BytesIO(data))], n, warmup=1)
        rows.append(LatencyRow(f"decode {label} JPEG, draft", d_draft,
                               f"to >= {spec.draft_size[0]}px: {load_image(io.BytesIO(data), draft=spec.draft_size).size}"))
        rows.append(LatencyRow(f"decode {label} JPEG, full", d_full, "in alternation with the row above"))
        ratios[f"decode {label}: full / draft"] = d_full.median / d_draft.median
        for r in rows[-4:]:
            log(f"  {r.what:44s} {r.timing.cell(2)} ms")
        if label == "1 MP" and verifier.bundle.second_look:
            rows += second_look_latency(verifier, path, product_id, n)
            for r in rows[-2:]:
                log(f"  {r.what:44s} {r.timing.cell(2)} ms")

    # preprocessing alone: crop + resize to the encoder input
    for label, image in (("grocery photo", load_image(photo)),
                         ("12 MP draft-decoded", load_image(files["12 MP"], draft=spec.draft_size)),
                         ("12 MP full-decoded", load_image(files["12 MP"]))):
        t = measure(lambda image=image: to_model_input(image, spec), runs if "full" not in label else runs_12mp_full)
        rows.append(LatencyRow(f"preprocess {label} ({image.width}x{image.height})", t, "to_model_input"))
        log(f"  {rows[-1].what:44s} {t.cell(3)} ms")

    # where the time of one 12 MP verify goes (draft decoding, as the engine does it)
    path = files["12 MP"]
    data = path.read_bytes()
    image = load_image(io.BytesIO(data), draft=spec.draft_size)
    views = to_photo_views(image, spec)
    capture = verifier.prepare(path)
    latent = verifier.embed(capture)
    small = analysis_copy(image)
    n = spec.num_views
    stages = {
        "read file": lambda: path.read_bytes(),
        "sha256 of the file": lambda: hashlib.sha256(data).hexdigest(),
        "decode (draft) + EXIF + RGB": lambda: load_image(io.BytesIO(data), draft=spec.draft_size),
        f"crop + resize to {n} view{'s' if n > 1 else ''}": lambda: to_photo_views(image, spec),
        f"encoder, {n} view{'s' if n > 1 else ''} (int8, 1 thread)": (
            (lambda: verifier.encoder.embed_with_cells(views, batch_size=n)) if verifier.cells_weight
            else (lambda: verifier.embed_views(views))),
        score_stage(verifier): lambda: verifier.score(latent, product_id, capture.cells),
        "capture quality check (small grey copy + checks)": lambda: assess(image),
        "near-copy dHashes (of the small copy, whole and trimmed)": lambda: (dhash(small), trimmed_hashes(small)),
    }
    breakdown = {}
    for name, fn in stages.items():
        t = measure(fn, runs, warmup=2)
        breakdown[name] = t
        rows.append(LatencyRow(f"12 MP stage: {name}", t, ""))
        log(f"  {rows[-1].what:44s} {t.cell(3)} ms")
    return rows, {"ratios": ratios,
                  "breakdown": {k: v.to_dict() for k, v in breakdown.items()}}
