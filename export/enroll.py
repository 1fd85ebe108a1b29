"""Enrolment: compute each original's latent with the TFLite model the device will run,
and write the reference bundle.

Using the device's own int8 model (not the Keras model) means the references and the
field photos are embedded by exactly the same arithmetic. This module needs no
TensorFlow.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from auditlens.catalog import Catalog, LabelledPhoto
from auditlens.device_app.bundle import (
    ProductRecord,
    calibration_of,
    check_decision,
    check_replaceable,
    is_signed,
    probe_image,
    sha256_bytes,
    write_bundle,
)
from auditlens.device_app.cells import quantize_cells
from auditlens.device_app.imaging import load_image
from auditlens.device_app.interpreter import Encoder, EncoderOptions
from auditlens.device_app.nearcopy import dhash, trimmed_hashes
from auditlens.device_app.preprocess import (
    PreprocessSpec,
    pool_views,
    to_model_input,
    to_photo_views,
)
from auditlens.device_app.quality import analysis_copy
from auditlens.device_app.rivals import missing_note, without_rivals
from auditlens.errors import (
    AuditlensError,
    BundleError,
    BundleFormatError,
    BundleSignatureError,
    CatalogError,
    ModelError,
)

DEFAULT_THRESHOLD = 0.5
"""Decision threshold for a model that ships no calibration; run `auditlens calibrate`."""

THUMBNAIL_SIDE = 160
"""Thumbnails are at most this many pixels on a side (display only)."""


@dataclass(frozen=True)
class EnrollOptions:
    """How a catalogue is enrolled."""

    threshold: float | None = None
    """Decision threshold to write; default: the model card's calibrated one."""
    thumbnail_side: int = THUMBNAIL_SIDE
    """Largest side of the stored thumbnails, in pixels."""
    workers: int = min(4, os.cpu_count() or 1)
    """Threads decoding originals in parallel (decoding releases the GIL)."""
    batch_size: int = 32
    """Images per interpreter call."""
    num_threads: int = min(2, os.cpu_count() or 1)
    """Interpreter threads."""
    photo_zooms: tuple[float, ...] | None = None
    """Views a field photo is embedded as (``PreprocessSpec.photo_zooms``); default: the
    model card's. A bundle whose views differ from the card's is not calibrated."""
    photo_mirror: bool | None = None
    """Add mirror images to a photo's views; default: the model card's."""
    photo_shift: float | None = None
    """Add shifted copies of each zoom's box (``PreprocessSpec.photo_shift``); default: the
    model card's."""
    progress: bool = True
    """Show a progress bar."""


def load_model_card(card: str | os.PathLike) -> dict:
    """A model card (the JSON `auditlens export` writes beside a model), refused with a
    :class:`ModelError` when it is missing, unreadable or not a JSON object."""
    card = Path(card)
    try:
        data = json.loads(card.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{card}: no such model card (auditlens export writes one beside the "
                         "model it exports)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{card}: the model card cannot be read ({exc}); repair it, or move it "
                         "away to go on without one") from exc
    if not isinstance(data, dict):
        raise ModelError(f"{card}: not a model card (not a JSON object)")
    return data


def model_card_path(model_path: str | os.PathLike) -> Path | None:
    """The card beside a model (``encoder.json`` or ``encoder.tflite.json``), if any."""
    path = Path(model_path)
    return next((card for card in (path.with_suffix(".json"), path.with_name(path.name + ".json"))
                 if card.is_file()), None)


def model_card(model_path: str | os.PathLike) -> dict:
    """The card beside a model, or an empty dict when there is none. A card that cannot be
    read is refused: enrolling without it would silently change views and threshold."""
    card = model_card_path(model_path)
    return load_model_card(card) if card is not None else {}


def cohort_path(card_path: str | os.PathLike) -> Path:
    """Where a card keeps the cohort its decision weighs cells against
    (:mod:`auditlens.device_app.cells`): ``encoder.cohort.npy`` beside ``encoder.json``."""
    return Path(card_path).with_suffix(".cohort.npy")


def card_cohort(card_path: Path, decision: dict) -> tuple[np.ndarray | None, str]:
    """The cohort of a card whose decision weighs cells, checked against its sha256; else
    None and why not."""
    path = cohort_path(card_path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        return None, f"cannot be read ({exc.strerror or exc})"
    if sha256_bytes(data) != decision["cells"].get("cohort_sha256"):
        return None, "is not the one it was calibrated with (its sha256 differs)"
    try:
        return np.load(io.BytesIO(data), allow_pickle=False), ""
    except Exception as exc:  # numpy raises many types
        return None, f"is not a readable array ({exc!r})"


def default_model_path() -> Path:
    """The model shipped with auditlens."""
    from importlib.resources import files

    return Path(str(files("auditlens.models") / "encoder.tflite"))


@dataclass
class _Loaded:
    model_input: np.ndarray
    thumbnail: bytes
    dhash: str
    box_dhashes: tuple[str, ...]


def _load_original(product, spec: PreprocessSpec, side: int) -> _Loaded:
    image = product.open(draft=spec.draft_size)
    thumb = image.copy()
    thumb.thumbnail((side, side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    thumb.save(buf, "JPEG", quality=85)
    return _Loaded(to_model_input(image, spec), buf.getvalue(), dhash(image), trimmed_hashes(analysis_copy(image)))


def _check_calibration_kept(out, replaced: dict | None, decision: dict) -> None:
    """Refuse to replace a bundle whose threshold was calibrated (for it, or carried from
    a model card) by one that would judge with another: the calibration is lost in silence
    otherwise (re-enrolling to add a product after `calibrate` wrote the threshold into the
    bundle alone)."""
    same = ("threshold", "target_far", "calibrated_on")
    if replaced is None or all(replaced.get(k) == decision.get(k) for k in same):
        return
    now = (f"the threshold {decision['threshold']:.4f}, " + (
        f"calibrated on {decision['calibrated_on']}" if decision.get("target_far") else
        "set by hand" if decision.get("calibrated_on") else "not calibrated"))
    raise BundleError(
        f"{out} holds a threshold calibrated for a {replaced['target_far']:g} false-accept rate "
        f"({replaced['threshold']:.4f}, on {replaced.get('calibrated_on')}); the bundle enrolled now would "
        f"judge with {now}. Replacing it would lose that calibration: enroll to another --out and run "
        "`auditlens calibrate` on it (or calibrate with --model-card, so that enrolments carry the "
        f"threshold), or remove {out} first; nothing was written")


def _check_spread(original_latents: np.ndarray, groups: list[list[int]], model_id: str) -> None:
    """Refuse a model that gives every original nearly the same latent (one trained for
    too short a time, or diverged): any photo would score about 1 against any product, a
    MATCH at an uncalibrated threshold. Originals are counted once per distinct picture,
    and it takes three: two products may legitimately look alike (two sizes of one carton)."""
    from auditlens.evaluation.metrics import ONE_LATENT_COSINE, mean_cross_cosine

    # one picture enrolled for several products (a group of :func:`_input_groups`) is warned of apart
    distinct = np.asarray(original_latents)[[group[0] for group in groups]]
    if len(distinct) < 3:
        return
    spread = mean_cross_cosine(distinct)
    if spread >= ONE_LATENT_COSINE:
        raise ModelError(
            f"model {model_id} gives every original nearly the same latent (mean cosine "
            f"{spread:.4f} between {len(distinct)} different originals, as if each were a copy of the others): "
            "it cannot tell products apart, and any photo would MATCH any product. Train it longer "
            "(--epochs, --steps-per-epoch) or check why the run diverged (or, if the originals are "
            "copies of one picture, give each product its own); nothing was written")


def _embed(encoder: Encoder, images: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Unit latents of ``images``, and their unit cells when the model gives them."""
    if encoder.has_cells:
        return encoder.embed_with_cells(images, batch_size=batch_size)
    return encoder.embed(images, batch_size=batch_size), None


def _load_photo(photo: LabelledPhoto, spec: PreprocessSpec) -> np.ndarray:
    try:
        return to_photo_views(load_image(photo.photo, draft=spec.draft_size), spec)
    except AuditlensError as exc:
        raise CatalogError(f"reference photo for {photo.product_id!r}: {exc}") from exc


def _input_groups(loaded: Sequence[_Loaded]) -> list[list[int]]:
    """The originals grouped by the pixels they reach the encoder as (indices, in catalogue
    order): products in one group share a picture (a placeholder, one image filed under two
    ids)."""
    by_input: dict[bytes, list[int]] = {}
    for i, item in enumerate(loaded):
        by_input.setdefault(hashlib.sha256(item.model_input.tobytes()).digest(), []).append(i)
    return list(by_input.values())


def _same_inputs(catalog: Catalog, groups: list[list[int]]) -> list[str]:
    """A note for each group of :func:`_input_groups` with more than one product: they get
    the same reference, so a photo of any of them matches them all."""
    notes = []
    for group in groups:
        ids = [catalog[i].product_id for i in group]
        if len(ids) > 1:
            notes.append(f"products {', '.join(ids[:4])}{', ...' if len(ids) > 4 else ''} ({len(ids)}) have "
                         "the same original image, so a photo of any of them matches them all: give each its own image")
    return notes


def enroll(
    catalog: Catalog,
    out: str | os.PathLike,
    *,
    model: str | os.PathLike | None = None,
    extra_references: Sequence[LabelledPhoto] = (),
    options: EnrollOptions | None = None,
    signing_key: bytes | str | None = None,
    drop_signature: bool = False,
    warn: Callable[[str], None] | None = None,
) -> Path:
    """Embed every original (and approved extra reference photos) and write a bundle.

    ``warn`` is told when the bundle's threshold is not a calibrated one (the model card
    has none for the photo views enrolled, and none was given).

    Every product whose original cannot be used, and every unusable reference photo, is
    reported in one :class:`CatalogError`; no bundle is written then. An ``out`` that holds
    anything but a bundle (or an empty folder) is refused with a :class:`BundleError`, and
    a model card beside the model that cannot be read with a :class:`ModelError`, before
    any work.
    """
    check_replaceable(out)
    replaced_calibration = calibration_of(out)
    if signing_key is None and not drop_signature and is_signed(out):
        raise BundleSignatureError(
            f"{out} holds a signed bundle; replacing it unsigned would drop the publisher's "
            "signature, and devices that require one would refuse the new bundle: pass --sign-key "
            "publisher.key (or --drop-signature to write it unsigned)")
    if signing_key is not None:  # a key that cannot sign fails now, not after the embedding
        from auditlens.device_app.signing import public_key_of

        public_key_of(signing_key)
    options = options or EnrollOptions()
    model_path = Path(model) if model is not None else default_model_path()
    try:
        content = model_path.read_bytes()
    except OSError as exc:
        raise ModelError(f"{model_path}: cannot read the model file: {exc.strerror or exc}") from exc
    card = model_card(model_path)
    encoder = Encoder(content, EncoderOptions(num_threads=options.num_threads), source=model_path)
    if card.get("model_id") not in (None, encoder.model_id):
        raise ModelError(f"the model card beside {model_path} is for model {card['model_id']}, not this "
                         f"model {encoder.model_id}: export the model again (export writes its card), or "
                         "move the card away")
    try:
        card_spec = (PreprocessSpec.from_dict(card["preprocess"]) if "preprocess" in card
                     else PreprocessSpec(encoder.input_size))
        if card.get("decision") is not None:
            check_decision(card["decision"], model_path, "its decision", spec=card_spec)
        if card_spec.input_size != encoder.input_size:
            raise ValueError(f"it gives an input of {card_spec.input_size} px, but the model takes "
                             f"{encoder.input_size} px: they do not belong together (export writes a model's card)")
    except (ValueError, KeyError, TypeError, BundleFormatError) as exc:
        raise ModelError(f"the model card beside {model_path} is not usable ({exc!s}); repair it, or "
                         "move it away to go on without one") from exc
    try:
        spec = replace(
            card_spec,
            photo_zooms=card_spec.photo_zooms if options.photo_zooms is None else tuple(options.photo_zooms),
            photo_mirror=card_spec.photo_mirror if options.photo_mirror is None else options.photo_mirror,
            photo_shift=card_spec.photo_shift if options.photo_shift is None else options.photo_shift,
        )
    except ValueError as exc:  # e.g. a wider zoom than the card's shift leaves room for
        hint = (f" (the model card's photo_shift is {card_spec.photo_shift:g}: set --photo-shift too)"
                if options.photo_shift is None and card_spec.photo_shift else "")
        raise CatalogError(f"photo views: {exc}{hint}") from exc

    if warn and not card:
        warn(f"no model card beside {model_path} (the {model_path.with_suffix('.json').name} "
             f"that `auditlens export` writes): the preprocessing is assumed ({spec.input_size} px, "
             f"{spec.crop} crop, photo views {', '.join(f'{z:g}' for z in spec.photo_zooms)}"
             f"{', mirrored' if spec.photo_mirror else ''}"
             f"{f', shifted by {spec.photo_shift:g}' if spec.photo_shift else ''}); a "
             "model trained otherwise scores badly with it: put the card beside the model")

    extras: dict[str, list[LabelledPhoto]] = {}
    for photo in extra_references:
        if photo.product_id not in catalog:
            raise CatalogError(f"reference photo {photo.photo}: product {photo.product_id!r} is not in the catalogue")
        extras.setdefault(photo.product_id, []).append(photo)

    loaded: list[_Loaded | None] = [None] * len(catalog)
    failures: list[str] = []
    with ThreadPoolExecutor(options.workers) as pool:
        futures = [pool.submit(_load_original, p, spec, options.thumbnail_side) for p in catalog]
        for i, fut in enumerate(tqdm(futures, desc="originals", unit="img", disable=not options.progress)):
            try:
                loaded[i] = fut.result()
            except AuditlensError as exc:
                failures.append(str(exc))
        extra_futures = {pid: [pool.submit(_load_photo, ph, spec) for ph in photos]
                         for pid, photos in extras.items()}
        extra_inputs: dict[str, list[np.ndarray]] = {}
        bad_photos: list[str] = []
        for pid, futs in extra_futures.items():
            for fut in futs:
                try:
                    extra_inputs.setdefault(pid, []).append(fut.result())
                except AuditlensError as exc:
                    bad_photos.append(str(exc))
    problems = []
    if failures:
        problems.append(f"{len(failures)} product(s) could not be enrolled:\n  " + "\n  ".join(failures))
    if bad_photos:
        problems.append(f"{len(bad_photos)} reference photo(s) could not be used:\n  " + "\n  ".join(bad_photos))
    if problems:
        raise CatalogError("\n".join(problems))
    groups = _input_groups(loaded)
    if warn:
        for note in _same_inputs(catalog, groups):
            warn(note)

    # Originals are embedded as they are (a studio image, one view); an extra reference
    # photo is a field photo and gets the photo's views, as on the device.
    inputs, photo_views, photo_rows, records = [], [], [], []
    for product, item in zip(catalog, loaded):
        assert item is not None
        rows = [len(inputs) + len(photo_views)]
        inputs.append(item.model_input)
        for extra in extra_inputs.get(product.product_id, []):
            rows.append(len(inputs) + len(photo_views))
            photo_rows.append(rows[-1])
            photo_views.append(extra)
        records.append(ProductRecord(product.product_id, product.name, product.group, product.kind,
                                     product.code, tuple(rows), item.dhash, box_dhashes=item.box_dhashes))
    # stacked one batch at a time: a whole-catalogue np.stack would double peak memory
    embedded = [_embed(encoder, np.stack(inputs[i:i + options.batch_size]), options.batch_size)
                for i in tqdm(range(0, len(inputs), options.batch_size), desc="embedding", unit="batch",
                              disable=not options.progress)]
    original_latents = np.concatenate([latent for latent, _ in embedded])
    _check_spread(original_latents, groups, encoder.model_id)
    latents = np.empty((len(inputs) + len(photo_views), encoder.latent_dim), np.float32)
    is_photo = np.zeros(len(latents), bool)
    is_photo[photo_rows] = True
    latents[~is_photo] = original_latents
    cells = None
    if encoder.has_cells:
        cells = np.empty((len(latents), encoder.cell_count, encoder.latent_dim), np.int8)
        cells[~is_photo] = np.concatenate([quantize_cells(c) for _, c in embedded])
    if photo_views:
        view_latents, view_cells = _embed(encoder, np.concatenate(photo_views), spec.num_views)
        latents[is_photo] = pool_views(view_latents, spec.num_views)
        if cells is not None:  # a photo reference's cells are those of its first view
            cells[is_photo] = quantize_cells(view_cells[::spec.num_views])

    uncalibrated = {"threshold": DEFAULT_THRESHOLD, "target_far": None, "calibrated_on": None}
    # The card's threshold was calibrated on photos embedded with the card's views.
    decision = dict(card.get("decision") or uncalibrated) if spec == card_spec else uncalibrated
    why = "the model card has none for these photo views" if card else "no model card beside the model"
    if decision.get("model_id") not in (None, encoder.model_id):
        decision, why = uncalibrated, (f"the model card's was calibrated for model {decision['model_id']}, "
                                       f"not this model {encoder.model_id}")
    if photo_views and decision.get("target_far"):
        # ... and against originals alone: a photo reference lifts impostors' best scores
        # too (docs/ablation.md: one per product takes the shipped card's 1% to 3.3%)
        decision = {"threshold": decision["threshold"], "target_far": None, "calibrated_on": None}
        why = ("the model card's was calibrated against originals alone, and extra reference "
               "photos raise impostors' scores as well as genuine ones")
    if decision.get("target_far"):
        from auditlens.device_app.bundle import products_fingerprint

        calibrated_on = decision.get("products") or {}
        if calibrated_on.get("sha256") != products_fingerprint(p.product_id for p in catalog)["sha256"]:
            # the threshold carries over; the false-accept rate measured for it does not
            note = (f"the threshold was calibrated on another catalogue "
                    f"({calibrated_on.get('count', '?')} products, "
                    f"{decision.get('calibrated_on')}); its false-accept rate on these "
                    f"{len(catalog)} products is not measured: run `auditlens calibrate` "
                    "on labelled photos of them")
            decision["warnings"] = [*decision.get("warnings", []), note]
            if warn and options.threshold is None:
                warn(note)
        rivals_missing = missing_note(decision, [p.product_id for p in catalog])
        if rivals_missing:  # the card's rivals are not all enrolled: its threshold without them
            decision = without_rivals(decision)
            decision["warnings"] = [*decision.get("warnings", []), rivals_missing]
            if warn and options.threshold is None:
                warn(rivals_missing)
    if options.threshold is not None:
        decision = {"threshold": float(options.threshold), "target_far": None,
                    "calibrated_on": "set by hand at enrolment"}
    if warn and not decision.get("target_far") and not decision.get("calibrated_on"):
        warn(f"the threshold {decision['threshold']:.3f} is not calibrated ({why}): run "
             "`auditlens calibrate` on labelled photos before field use")
    _check_calibration_kept(out, replaced_calibration, decision)
    cohort = None
    if decision.get("cells"):  # the cohort the card's threshold was calibrated with
        card_path = model_card_path(model_path)
        cohort, why = card_cohort(card_path, decision)
        if cohort is None:
            note = (f"the threshold weighs cells against the cohort {cohort_path(card_path).name} beside "
                    f"the model card, which {why}: the bundle's own {len(records)} originals stand in, "
                    "so its scores and the card's rates may not agree; copy the cohort with the model "
                    "and its card (calibrate --model-card writes it)")
            decision["warnings"] = [*decision.get("warnings", []), note]
            if warn:
                warn(note)
    if cohort is None and cells is not None:  # the catalogue's own originals
        cohort = cells[[record.references[0] for record in records]]
    return write_bundle(
        out, model_content=content, spec=spec, products=records, references=latents,
        thumbnails=[item.thumbnail for item in loaded if item is not None], decision=decision,
        probe_latent=encoder.embed(probe_image(spec.input_size))[0],
        extra={"catalog": Path(catalog.source).name}, signing_key=signing_key, cells=cells, cohort=cohort,
    )
