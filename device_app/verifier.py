"""Verify a field photo against a product's original: the heart of auditlens.

``Verifier(bundle).verify(photo, product_id)`` returns a :class:`Verdict`: MATCH when
the photo's latent is at least the bundle's calibrated threshold close (cosine) to one
of the product's references (plus, for a bundle that weighs them, the match of its
feature-map cells with the product's, standardised against a cohort: :mod:`.cells`), NO
MATCH below it (with the products the photo resembles most), and RETAKE when the capture itself cannot be judged (too dark, blurred, no
product) or merely reproduces the catalogue original instead of photographing the
product.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from auditlens.device_app.auditlog import utc_now
from auditlens.device_app.bundle import ReferenceBundle, probe_image
from auditlens.device_app.cells import (
    as_float_cells,
    cell_scores,
    fuse,
    held_for_scoring,
    product_cell_scores,
    quantize_cells,
    score_ceiling,
)
from auditlens.device_app.imaging import (
    DEFAULT_MAX_PIXELS,
    ImageSource,
    image_from_array,
    load_image,
    not_a_file,
    reduce_like_draft,
)
from auditlens.device_app.interpreter import Encoder, EncoderOptions, model_id_of
from auditlens.device_app.nearcopy import copies, dhash, trimmed_hashes
from auditlens.device_app.preprocess import PreprocessSpec, moved_views, pool_views, to_photo_views
from auditlens.device_app.quality import Quality, QualityThresholds, analysis_copy, assess
from auditlens.device_app.rivals import RIVAL_SHORTLIST, best_rivals, penalise, rival_shortlist
from auditlens.device_app.search import ReferenceSearch, check_top_k, top_of
from auditlens.errors import (
    BundleSignatureError,
    ImageTooLargeError,
    ModelError,
    ModelMismatchError,
    UnreadableImageError,
)

MATCH, NO_MATCH, RETAKE = "match", "no_match", "retake"

CELL_SHORTLIST = 64
"""``identify`` and a NO MATCH's suggestions add the cell term to the products the cosine
ranks best, this many (every product of a catalogue this small): the cell term costs a
matrix product per reference, and a product far down the cosine's ranking does not climb
into the first few."""


@dataclass(frozen=True)
class PhotoCells:
    """A photo's cells as the verifier scores them."""

    cells: np.ndarray
    """int8 (1, V, C, D)."""
    cohort: np.ndarray
    """(K,): its cell scores against the bundle's cohort, which standardise the others."""
    ranked: dict = field(default_factory=dict, compare=False)
    """Memoised first-look rankings by ``(top_k, shortlist)`` (a NO MATCH's suggestions and a
    photo's rival do not depend on the product claimed, and ``score`` judges one photo
    against many)."""


def _other_than(ranked: list[Candidate], product_id: str) -> Candidate | None:
    """The best of ``ranked`` that is not ``product_id``."""
    return next((c for c in ranked if c.product_id != product_id), None)


PROBE_MIN_COSINE = 0.98
"""The bundle's probe latent and the model's must agree this well (same model, any CPU)."""


MAX_THREADS = 256
"""Interpreter threads a Verifier may ask for: far above any device's cores; LiteRT starts
every one of them, and a million crashed its teardown (the command line's ``--threads``
takes the same limit)."""


@dataclass(frozen=True)
class VerifierOptions:
    """How verification runs and decides."""

    num_threads: int = 1
    """Interpreter threads."""
    threshold: float | None = None
    """Override the bundle's calibrated decision threshold (a score: a cosine, moved by the
    cell term of a bundle that weighs cells; the verifier refuses one outside the bundle's
    scores)."""
    suggestions: int = 3
    """How many look-alike products a NO MATCH lists."""
    check_quality: bool = True
    """Send unusable captures back for a RETAKE instead of judging them."""
    quality: QualityThresholds = field(default_factory=QualityThresholds)
    """Limits of the capture-quality check."""
    near_duplicate_bits: int = 5
    """A photo whose 64-bit dHash (of the frame, or of the frame with its plain borders
    trimmed) is within this many bits of the original's copies it."""
    max_pixels: int = DEFAULT_MAX_PIXELS
    """Refuse photos larger than this (decompression-bomb guard)."""
    max_file_bytes: int = 100 * 1024**2
    """Refuse photo files larger than this before reading them (100 MiB)."""
    second_look: bool = True
    """Take the bundle's second look at photos that score near the threshold, when it has
    one (:mod:`.second_look`). Off, every verify costs the same, and verdicts near the
    threshold are those of the first views alone. A threshold given by hand turns it off:
    the second look's threshold was calibrated with the bundle's."""

    def __post_init__(self) -> None:
        """Refuse settings that would fail later or silently decide every photo the same
        way (a threshold read as text from a service's environment, NaN, 1.5)."""
        def whole(name: str, least: int, most: int | None = None) -> None:
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, (int, np.integer))
                    or value < least or (most is not None and value > most)):
                span = f"{least} to {most}" if most is not None else f"at least {least}"
                raise ValueError(f"VerifierOptions.{name} must be a whole number {span}, not {value!r}")
            object.__setattr__(self, name, int(value))  # numpy's integers reach LiteRT as int

        whole("num_threads", 1, MAX_THREADS)
        whole("suggestions", 0)
        whole("near_duplicate_bits", 0, 64)
        whole("max_pixels", 1)
        whole("max_file_bytes", 1)
        if self.threshold is not None:
            t = self.threshold
            if isinstance(t, bool) or not isinstance(t, (int, float, np.number)) or not math.isfinite(t):
                raise ValueError(f"VerifierOptions.threshold must be a finite score, a cosine within -1..1 "
                                 f"moved by the cell term of a bundle that weighs cells (or None for the "
                                 f"bundle's calibrated one), not {t!r}")
            object.__setattr__(self, "threshold", float(t))
        for name in ("check_quality", "second_look"):
            value = getattr(self, name)
            if not isinstance(value, (bool, np.bool_)):  # "no" would read as true
                raise ValueError(f"VerifierOptions.{name} must be True or False, not {value!r}")
            object.__setattr__(self, name, bool(value))
        if not isinstance(self.quality, QualityThresholds):
            raise ValueError(f"VerifierOptions.quality must be QualityThresholds, not {self.quality!r}")


@dataclass(frozen=True)
class Candidate:
    """A product a photo resembles, with its score."""

    product_id: str
    name: str
    score: float


@dataclass(frozen=True)
class Verdict:
    """The outcome of one verification, with everything an auditor needs later."""

    decision: str
    """'match', 'no_match' or 'retake'."""
    product_id: str
    score: float
    """Cosine similarity between the photo and the product's closest reference, -1..1;
    for a bundle that weighs cells, plus the cell term (:func:`~.cells.fuse`), which can
    take it a little past either end."""
    threshold: float
    """Scores at or above this are a match."""
    estimated_far: float | None
    """Share of other products' photos that score this high in calibration (None if the
    bundle was not calibrated): the chance that a wrong product would pass at this score."""
    reasons: tuple[str, ...]
    model_id: str
    photo_sha256: str
    quality: Quality
    near_duplicate: bool = False
    suggestions: tuple[Candidate, ...] = ()
    target_far: float | None = None
    """The false-accept rate the threshold was calibrated for, if it was."""
    judged_utc: str = ""
    """When the photo was judged (UTC, ISO 8601). An audit record also carries the time it
    was written, later when the log could not take the verdict at once."""
    bundle_id: str = ""
    """The reference bundle judged against (:attr:`ReferenceBundle.bundle_id`): with
    ``model_id``, which references and threshold the verdict rests on."""
    first_score: float | None = None
    """When a second look decided (the first score was near the threshold): the first
    score; ``score`` and ``threshold`` are then the second look's. None when the first
    look decided."""
    first_threshold: float | None = None
    """The threshold ``first_score`` was compared with (the bundle's), when a second look
    decided."""

    @property
    def matched(self) -> bool:
        return self.decision == MATCH

    @property
    def outscored(self) -> bool:
        """Whether a suggested product scores above the claimed one (the photo then looks
        more like it); otherwise the suggestions are only the claimed product's nearest
        neighbours."""
        claimed = self.score if self.first_score is None else self.first_score  # as the suggestions were scored
        return bool(self.suggestions) and self.suggestions[0].score > claimed

    def to_dict(self) -> dict:
        d = asdict(self)
        d["reasons"] = list(self.reasons)
        d["quality"] = self.quality.to_dict()
        d["suggestions"] = [asdict(c) for c in self.suggestions]
        return d


@dataclass
class Capture:
    """A decoded photo, ready to score; everything derived from its pixels is computed
    once, so scoring it against many products costs one decode and one inference."""

    views: np.ndarray
    """uint8 (V, S, S, 3): the encoder inputs of the photo's views (the spec's zooms and
    mirror images); the latent is their pooled latent."""
    sha256: str
    quality: Quality
    dhash: str
    """The whole frame's 64-bit difference hash (:mod:`.nearcopy`)."""
    image: Image.Image | None = None
    """The upright RGB photo (None when the caller asked not to keep it)."""
    latent: np.ndarray | None = None
    """Memoised unit latent, filled by :meth:`Verifier.embed`."""
    view_latents: np.ndarray | None = None
    """The unit latents of ``views``, one a row, that ``latent`` pools."""
    cells: np.ndarray | None = None
    """Memoised feature-map cells (V, C, D) of ``views``, int8 as a bundle stores them, filled
    by :meth:`Verifier.embed` for a bundle that weighs cells into the score (:mod:`.cells`)."""
    scored_cells: tuple[str, PhotoCells] | None = None
    """Memoised (bundle id, the cells' scores against that bundle's cohort)."""
    second_latents: dict[float, np.ndarray] = field(default_factory=dict)
    """Memoised unit latents of second looks (:meth:`Verifier.embed_second_look`), by shift."""
    model_id: str | None = None
    """The model that computed ``latent``; another verifier's model embeds it again."""
    spec: PreprocessSpec | None = None
    """The preprocessing ``views`` were made with; another bundle's makes them again."""
    box_dhashes: tuple[str, ...] = ()
    """The dHashes of the frame with its plain borders trimmed (a screenshot's canvas, a
    frame): :func:`~auditlens.device_app.nearcopy.trimmed_hashes`."""

    def release_pixels(self) -> None:
        """Forget the pixels once the latent is known; quality, dHash and latent stay (a
        second look needs them: :meth:`Verifier.embed_second_look` first)."""
        if self.latent is None:
            raise ValueError("embed the capture before releasing its pixels")
        self.image = None
        self.views = None  # type: ignore[assignment]


def _check_loaded_signature(bundle: ReferenceBundle, public_key: bytes | str) -> None:
    """A bundle handed over already loaded was checked against ``public_key`` when it was
    loaded, or it is refused: its signature is only read at load time."""
    from auditlens.device_app.signing import fingerprint

    wanted = fingerprint(public_key)
    if bundle.signed_by != wanted:
        how = (f"was checked against key {bundle.signed_by}" if bundle.signed_by
               else "was loaded without checking its signature")
        raise BundleSignatureError(
            f"{bundle.path}: the bundle {how}, not against the publisher key {wanted}; load it "
            "with ReferenceBundle.load(path, public_key=...) or pass its path")


def _read_photo_file(path: Path, max_bytes: int) -> bytes:
    """Read a photo file, refusing missing, empty and oversized files before reading."""
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise UnreadableImageError(f"{path}: {not_a_file(path)}")
        if size == 0:
            raise UnreadableImageError(f"{path}: the file is empty (0 bytes)")
        if size > max_bytes:
            raise ImageTooLargeError(f"{path}: {size:,} bytes is more than the {max_bytes:,} a photo may have")
        return path.read_bytes()
    except FileNotFoundError:
        raise UnreadableImageError(f"{path}: no such image file") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the path
        raise UnreadableImageError(f"{path!s:.200}: cannot read the file: {exc}") from exc


def _read_stream(stream, max_bytes: int) -> bytes:
    """Read a photo from a file-like object, refusing one longer than ``max_bytes``
    without reading more than one byte past it."""
    name = getattr(stream, "name", "the photo stream")
    chunks, size = [], 0
    while size <= max_bytes:  # a raw stream (pipe, socket) returns what it has, not all
        try:
            chunk = stream.read(max_bytes + 1 - size)
        except (OSError, ValueError) as exc:  # ValueError: a closed file
            raise UnreadableImageError(f"{name}: cannot read the photo stream: {exc}") from exc
        if isinstance(chunk, str):
            raise UnreadableImageError(f"{name}: the stream gives text, not bytes; open the photo "
                                       "in binary mode ('rb')")
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    data = b"".join(chunks)
    if len(data) > max_bytes:
        raise ImageTooLargeError(f"{name}: more than the {max_bytes:,} bytes a photo may have")
    if not data:
        raise UnreadableImageError(f"{name}: the stream gave no bytes: nothing was uploaded, or it was "
                                   "read to its end before (seek(0) rewinds it)")
    return data


def far_share(far: float) -> str | None:
    """An estimated false-accept rate as people read it ("0.96%", "< 0.01%"); None when
    the score is above every impostor of the calibration (an estimate of 0, not a
    certainty). One wording for the CLI and the app."""
    if far <= 0:
        return None
    return "< 0.01%" if far < 0.0001 else f"{far:.2%}"


def score_against_threshold(score: float, threshold: float, relation: str, *, word: str = "score") -> str:
    """"score 0.612 >= threshold 0.572", with as many decimals (3 to 6) as it takes for the
    two numbers not to print alike ("score 0.9996 < threshold 1.0000", not 1.000 < 1.000)."""
    digits = 3
    while digits < 6 and f"{score:.{digits}f}" == f"{threshold:.{digits}f}":
        digits += 1
    return f"{word} {score:.{digits}f} {relation} threshold {threshold:.{digits}f}"


class Verifier:
    """Scores photos against a reference bundle with the bundle's own encoder."""

    def __init__(
        self,
        bundle: ReferenceBundle | str | os.PathLike,
        options: VerifierOptions | None = None,
        *,
        model: str | os.PathLike | bytes | None = None,
        public_key: bytes | str | None = None,
    ) -> None:
        """Args:
        bundle: a loaded bundle or its path.
        model: a model installed separately on the device; refused unless it is the
            model the bundle's latents were computed with.
        public_key: the publisher's Ed25519 key; unsigned bundles are then refused.
        """
        self.options = options or VerifierOptions()
        if not isinstance(bundle, ReferenceBundle):
            bundle = ReferenceBundle.load(bundle, public_key=public_key)
        elif public_key is not None:
            _check_loaded_signature(bundle, public_key)
        self.bundle = bundle
        content = bundle.model_content
        if model is not None:
            try:
                content = bytes(model) if isinstance(model, (bytes, bytearray)) else Path(model).read_bytes()
            except OSError as exc:
                raise ModelError(f"{model}: cannot read the model: {exc.strerror or exc}") from exc
            if model_id_of(content) != bundle.model_id:
                raise ModelMismatchError(
                    f"model {model_id_of(content)} does not belong to bundle {bundle.path} "
                    f"(its latents were computed with model {bundle.model_id}); "
                    "install the bundle made for this model"
                )
        self.encoder = Encoder(content, EncoderOptions(num_threads=self.options.num_threads),
                               source=None if model is None or isinstance(model, (bytes, bytearray)) else model)
        self.spec = bundle.spec
        if self.encoder.input_size != self.spec.input_size or self.encoder.latent_dim != bundle.references.shape[1]:
            raise ModelMismatchError(
                f"the model takes {self.encoder.input_size}px images and gives "
                f"{self.encoder.latent_dim}-d latents, the bundle expects {self.spec.input_size}px "
                f"and {bundle.references.shape[1]}-d"
            )
        self._check_probe()
        # built here, once (not on a first identify, which services make from many threads):
        # a large catalogue's int8 index takes about 0.2 s per 100,000 products
        self.search = ReferenceSearch(bundle.references, bundle.reference_owner, len(bundle.products))
        self.cells_weight = bundle.cells_weight
        """The cell term's weight in every score (:func:`~.cells.fuse`); 0: the cosine alone."""
        self.rival_weight = bundle.rival_weight
        """The rival term's weight (:mod:`.rivals`); 0: a claim's score ignores the others'."""
        if self.cells_weight:  # converted once (:func:`~.cells.as_float_cells`)
            self._cohort_cells = as_float_cells(bundle.cohort)
            self._reference_cells = held_for_scoring(bundle.cells)
        limit = score_ceiling(self.cells_weight)
        if self.options.threshold is not None and not -limit <= self.options.threshold <= limit:
            raise ValueError(f"VerifierOptions.threshold {self.options.threshold:g} lies outside the scores "
                             f"this bundle gives ({'a cosine within -1..1' if limit == 1 else f'-{limit:g}..{limit:g}'})")
        if self.cells_weight and not self.encoder.has_cells:
            raise ModelMismatchError(f"{bundle.path}: the bundle weighs feature-map cells into the score, "
                                     "but its model gives none")
        self.threshold = (self.options.threshold if self.options.threshold is not None
                          else bundle.threshold)
        self.second_look = (bundle.second_look if self.options.second_look and self.options.threshold is None
                            else None)
        # a rate measured on another catalogue's products is not quoted for these
        far_curve = bundle.decision.get("far_curve") if bundle.far_measured else None
        self._far_curve = np.asarray(far_curve, dtype=np.float64) if far_curve else None

    def _check_probe(self) -> None:
        expected = np.asarray(self.bundle.manifest["probe"]["latent"], dtype=np.float32)
        got = self.encoder.embed(probe_image(self.spec.input_size))[0]
        cosine = float(got @ expected / max(np.linalg.norm(expected), 1e-12))
        if not cosine >= PROBE_MIN_COSINE:  # NaN (a probe that overflows float32) fails too
            raise ModelMismatchError(
                f"{self.bundle.path}: the model does not reproduce the latents the references were "
                f"made with (probe cosine {cosine:.3f} < {PROBE_MIN_COSINE}); the model and the "
                "references do not belong together"
            )

    # -- capture --------------------------------------------------------------------
    def prepare(self, photo: ImageSource | np.ndarray, *, keep_image: bool = True) -> Capture:
        """Decode a photo (path, bytes, file, PIL image or grey/RGB/RGBA array) for scoring.

        ``keep_image=False`` drops the decoded pixels once the model input, quality and
        dHash are computed (batch scoring keeps thousands of captures). A second look
        needs them: a capture without them is judged by its first look alone, near the
        threshold too, and its verdict says so. To keep memory flat and the second look,
        keep the image, :meth:`embed` the capture, call :meth:`embed_second_look` when
        :meth:`takes_second_look` says so for its score, then :meth:`Capture.release_pixels`
        (as ``auditlens score`` does).

        A PIL image is taken as a decoded file: its EXIF orientation is applied. An image
        the caller turned upright by hand must not carry the tag any more (turn it with
        ``PIL.ImageOps.exif_transpose``, which clears it, or pass the file's bytes).
        """
        draft = self.spec.draft_size
        if isinstance(photo, np.ndarray):  # grey, RGB or RGBA; integer or 0..1 float
            photo = image_from_array(photo, max_pixels=self.options.max_pixels)
        if isinstance(photo, Image.Image):
            image = load_image(photo, max_pixels=self.options.max_pixels)
            # the digest is of the pixels as handed over (the audit log takes a lossless
            # encoding of them as this photo); the encoder sees them at the scale an encoded
            # photo is decoded at, so a photo scores nearly alike in every form
            digest = hashlib.sha256(image.tobytes()).hexdigest()
            image = reduce_like_draft(image, draft)
        else:
            if isinstance(photo, (str, os.PathLike)):
                data = _read_photo_file(Path(photo), self.options.max_file_bytes)
                source = io.BytesIO(data)
                source.name = str(photo)  # errors name the file
            elif isinstance(photo, (bytes, bytearray, memoryview)):
                data = bytes(photo)
                if len(data) > self.options.max_file_bytes:  # the same limit as for a file or a stream
                    raise ImageTooLargeError(f"the photo ({len(data):,} bytes): more than the "
                                             f"{self.options.max_file_bytes:,} bytes a photo may have")
                source = io.BytesIO(data)
                source.name = f"the photo ({len(data):,} bytes)"  # a camera's capture has no file name
            elif callable(getattr(photo, "read", None)):
                data = _read_stream(photo, self.options.max_file_bytes)
                source = io.BytesIO(data)
                source.name = str(getattr(photo, "name", "") or f"the photo ({len(data):,} bytes)")
            else:
                raise UnreadableImageError(
                    f"cannot read a photo from {type(photo).__name__}; pass a path, the encoded "
                    "bytes, a binary file object, a PIL image or a pixel array")
            image = load_image(source, max_pixels=self.options.max_pixels, draft=draft)
            digest = hashlib.sha256(data).hexdigest()
        small = analysis_copy(image)  # one small grey copy for both checks
        return Capture(to_photo_views(image, self.spec), digest,
                       assess(image, self.options.quality, analysed=small), dhash(small),
                       image if keep_image else None, spec=self.spec, box_dhashes=trimmed_hashes(small))

    def embed(self, capture: Capture) -> np.ndarray:
        """The capture's unit latent (computed once per capture and model). A capture
        prepared or embedded for another bundle (a second catalogue, a bundle replaced
        while a service runs) is embedded again with this one's model and views; once its
        pixels are released that is refused."""
        if (capture.latent is not None and capture.model_id == self.bundle.model_id and capture.spec == self.spec
                and (capture.cells is not None or not self.cells_weight)):
            return capture.latent
        if capture.spec != self.spec and capture.image is not None:
            capture.views, capture.spec = to_photo_views(capture.image, self.spec), self.spec
        if capture.views is None or capture.spec != self.spec:
            raise ModelMismatchError(
                f"this capture was prepared for model {capture.model_id or 'of another bundle'} and its "
                f"pixels were released; prepare the photo again to score it with model {self.bundle.model_id}")
        if self.cells_weight:  # int8 as a bundle keeps them: 16 KiB a photo, scored alike everywhere
            capture.view_latents, cells = self.encoder.embed_with_cells(capture.views, batch_size=len(capture.views))
            capture.cells = quantize_cells(cells)
        else:
            capture.view_latents = self.encoder.embed(capture.views, batch_size=len(capture.views))
        capture.latent = pool_views(capture.view_latents, len(capture.views))[0]
        capture.second_latents = {}
        capture.scored_cells = None
        capture.model_id = self.bundle.model_id
        return capture.latent

    def takes_second_look(self, score: float) -> bool:
        """Whether a first ``score`` (of a capture that is judged) is near enough the
        threshold for the bundle's second look."""
        return self.second_look is not None and bool(self.second_look.near(score, self.threshold))

    def embed_second_look(self, capture: Capture) -> np.ndarray:
        """The capture's unit latent with the bundle's second look: its views and their
        moved copies pooled (computed once per capture). Needs the capture's image, so
        call it before :meth:`Capture.release_pixels`."""
        if self.second_look is None:
            raise ValueError("this verifier takes no second look (the bundle has none, or "
                             "VerifierOptions turned it off)")
        latent = self._second_latent(capture)
        if latent is None:
            raise ModelMismatchError("the capture's pixels were released before its second look; "
                                     "prepare the photo again")
        return latent

    def _second_latent(self, capture: Capture) -> np.ndarray | None:
        """:meth:`embed_second_look`, or None when the capture's pixels are gone."""
        self.embed(capture)  # a capture embedded again has dropped its second looks
        shift = self.second_look.photo_shift
        if shift not in capture.second_latents:
            if capture.image is None:
                return None
            moved = moved_views(capture.image, self.spec, shift)
            latents = np.concatenate([capture.view_latents, self.encoder.embed(moved, batch_size=len(moved))])
            capture.second_latents[shift] = pool_views(latents, len(latents))[0]
        return capture.second_latents[shift]

    def embed_views(self, views: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        """Unit latents (N, D) of N photos from their consecutive views (N * V, S, S, 3)."""
        v = self.spec.num_views
        batch = batch_size or v
        return pool_views(self.encoder.embed(views, batch_size=batch), v)

    # -- scoring --------------------------------------------------------------------
    # ``cells``: the photo's (Capture.cells), which a bundle that weighs cells needs.
    def product_scores(self, latent: np.ndarray, cells: np.ndarray | None = None) -> np.ndarray:
        """The score of ``latent`` against every product, shape (P,): the best cosine of the
        product's references, plus the cell term for a bundle that weighs cells, less the
        rival term for one that weighs rivals."""
        cosines = self.search.product_scores(latent)
        scores = self._fused(cosines, self._cells_of(cells))
        if not self.rival_weight:
            return scores
        rivals = best_rivals(scores[None], rival_shortlist(cosines[None]))[0]
        return penalise(scores, rivals, self.rival_weight)

    def score(self, latent: np.ndarray, product_id: str, cells: np.ndarray | None = None) -> float:
        return self._claim_score(latent, product_id, self._cells_of(cells))

    def capture_score(self, capture: Capture, product_id: str) -> float:
        """The first look's score of an embedded capture against ``product_id`` (what
        :meth:`verify` compares first), its cell scores against the cohort computed once."""
        return self._claim_score(self.embed(capture), product_id, self._capture_cells(capture))

    def _claim_score(self, latent: np.ndarray, product_id: str, photo_cells: PhotoCells | None) -> float:
        return self._judged(self._score(latent, product_id, photo_cells), self._rival(latent, product_id, photo_cells))

    def _rival(self, latent: np.ndarray, product_id: str, photo_cells: PhotoCells | None) -> Candidate | None:
        """The product other than ``product_id`` the photo scores best against, for a bundle
        that weighs rivals."""
        return _other_than(self._near(latent, photo_cells), product_id) if self.rival_weight else None

    def _near(self, latent: np.ndarray, photo_cells: PhotoCells | None) -> list[Candidate]:
        """The cosine's best :data:`~.rivals.RIVAL_SHORTLIST` products, ranked by their
        scores before the rival term: where a photo's rival is sought (memoised with a
        capture's cells)."""
        return self._rank_raw(latent, RIVAL_SHORTLIST, photo_cells, shortlist=RIVAL_SHORTLIST)

    def _judged(self, score: float, rival: Candidate | None) -> float:
        """A claim's score less the rival term (:mod:`.rivals`)."""
        if rival is None:
            return score
        return float(penalise(np.float32(score), np.float32(rival.score), self.rival_weight))

    def rank(self, latent: np.ndarray, top_k: int = 5, cells: np.ndarray | None = None) -> list[Candidate]:
        """The ``top_k`` products most like ``latent``, best first, with the scores
        :meth:`score` gives them."""
        return self._rank(latent, top_k, self._cells_of(cells))

    def _rank(self, latent: np.ndarray, top_k: int, photo_cells: PhotoCells | None) -> list[Candidate]:
        """:meth:`_rank_raw` with each product's score as :meth:`score` gives it (the rival
        term lowers every product but the best: the order stays)."""
        ranked = self._rank_raw(latent, top_k, photo_cells)
        if not self.rival_weight:
            return ranked
        near = self._near(latent, photo_cells)
        return [replace(c, score=self._judged(c.score, _other_than(near, c.product_id))) for c in ranked]

    def _cells_of(self, cells: np.ndarray | None) -> PhotoCells | None:
        """A photo's cells with its cell scores against the cohort, when the bundle weighs
        cells; its scores against products are computed for the products asked about."""
        if not self.cells_weight:
            return None
        if cells is None:
            raise ValueError("this bundle weighs feature-map cells into the score: pass the photo's "
                             "cells (Capture.cells, which Verifier.embed fills)")
        photo = np.asarray(cells)[None]
        return PhotoCells(photo, cell_scores(photo, self._cohort_cells)[0])

    def _capture_cells(self, capture: Capture) -> PhotoCells | None:
        """:meth:`_cells_of` a capture's cells, computed once per capture and bundle (``score``
        judges one photo against many products)."""
        if not self.cells_weight:
            return None
        if capture.scored_cells is None or capture.scored_cells[0] != self.bundle.bundle_id:
            capture.scored_cells = (self.bundle.bundle_id, self._cells_of(capture.cells))
        return capture.scored_cells[1]

    def _fused(self, cosines: np.ndarray, photo_cells: PhotoCells | None) -> np.ndarray:
        """Every product's score from their cosines (P,)."""
        if photo_cells is None:
            return cosines
        every = product_cell_scores(photo_cells.cells, self._reference_cells, self.bundle.reference_owner,
                                    len(self.bundle.products))[0]
        return fuse(cosines, every, self.cells_weight, photo_cells.cohort)

    def _score(self, latent: np.ndarray, product_id: str, photo_cells: PhotoCells | None) -> float:
        rows = list(self.bundle.product(product_id).references)
        cosine = self.search.best_of_rows(latent, rows)
        if photo_cells is None:
            return cosine
        # the cell term needs this product's references and the cohort, not the catalogue
        own = cell_scores(photo_cells.cells, self._reference_cells[rows])[0].max()
        return float(fuse(np.array([cosine]), np.array([own]), self.cells_weight, photo_cells.cohort)[0])

    def _rank_raw(self, latent: np.ndarray, top_k: int, photo_cells: PhotoCells | None,
                  shortlist: int = CELL_SHORTLIST) -> list[Candidate]:
        """The ``top_k`` products by their scores before the rival term, with the cell term
        added to the cosine's best ``shortlist``."""
        if photo_cells is None:
            top, scores = self.search.top_k(latent, top_k)
        elif (top_k, shortlist) in photo_cells.ranked:
            return list(photo_cells.ranked[top_k, shortlist])
        else:  # the cell term for the best products by cosine (every product of a small catalogue)
            k = min(check_top_k(top_k), len(self.bundle.products))
            near, cosines = self.search.top_k(latent, max(k, shortlist))
            rows = [list(self.bundle.products[i].references) for i in near]
            sims = cell_scores(photo_cells.cells, self._reference_cells[np.concatenate(rows)])[0]
            own = np.maximum.reduceat(sims, np.r_[0, np.cumsum([len(r) for r in rows])[:-1]])
            fused = fuse(cosines, own, self.cells_weight, photo_cells.cohort)
            best = top_of(fused, k)
            top, scores = near[best], fused[best]
        ranked = [Candidate(self.bundle.products[i].product_id, self.bundle.products[i].name,
                            float(s)) for i, s in zip(top, scores)]
        if photo_cells is not None:
            photo_cells.ranked[top_k, shortlist] = ranked
        return ranked

    def estimated_far(self, score: float, *, second_look: bool = False) -> float | None:
        """The calibrated false-accept rate at a first score (or a second look's)."""
        curve = self._far_curve
        if second_look:
            curve = self.second_look.far_curve if self._far_curve is not None else None
        if curve is None:
            return None
        return float(np.interp(score, curve[:, 0], curve[:, 1]))

    def copies_original(self, capture: Capture, product_id: str) -> bool:
        """Whether the photo reproduces the product's catalogue original instead of showing
        the product: a dHash of its frame, or of the frame with its plain borders trimmed,
        within ``near_duplicate_bits`` of the original's (:mod:`.nearcopy`)."""
        record = self.bundle.product(product_id)
        return bool(record.dhash) and copies((capture.dhash, *capture.box_dhashes),
                                             (record.dhash, *record.box_dhashes), self.options.near_duplicate_bits)

    def retake_reasons(self, capture: Capture, product_id: str) -> list[str]:
        """Why the photo cannot be judged as ``product_id`` (a copy of its original, or a
        capture too dark, blurred, ... when quality is checked); empty when it can."""
        return self._retake_reasons(capture, self.copies_original(capture, product_id))

    def _retake_reasons(self, capture: Capture, copies_original: bool) -> list[str]:
        if copies_original:
            return ["the photo reproduces the catalogue original instead of showing the product: "
                    "photograph the product itself"]
        return list(capture.quality.issues) if self.options.check_quality and not capture.quality.ok else []

    # -- the public verbs -----------------------------------------------------------
    def verify(self, photo: ImageSource | np.ndarray | Capture, product_id: str) -> Verdict:
        """Decide whether ``photo`` shows ``product_id``."""
        self.bundle.product(product_id)  # unknown ids fail before any decoding
        capture = photo if isinstance(photo, Capture) else self.prepare(photo)
        latent = self.embed(capture)
        photo_cells = self._capture_cells(capture)
        rival = self._rival(latent, product_id, photo_cells)
        score = self._judged(self._score(latent, product_id, photo_cells), rival)
        threshold, first_score, first_threshold = self.threshold, None, None
        near_duplicate = self.copies_original(capture, product_id)
        reasons = self._retake_reasons(capture, near_duplicate)
        if reasons:
            decision = RETAKE
        else:
            if self.takes_second_look(score):
                near = score_against_threshold(score, threshold, "near", word="first score")
                second = self._second_latent(capture)
                if second is None:
                    reasons.append(f"{near}: no second look, the capture's pixels were released")
                else:
                    first_score, first_threshold = score, threshold
                    # the second look rescores the claim; its rival stays the first look's
                    score = self._judged(self._score(second, product_id, photo_cells), rival)
                    threshold = self.second_look.threshold
                    reasons.append(f"{near}: a second look with {len(capture.view_latents) * 5} views")
            decision = MATCH if score >= threshold else NO_MATCH
            if rival is not None and rival.score > score:
                reasons.append(f"{rival.product_id} scores higher ({rival.score:.3f}): the claim's score is "
                               f"lowered by {self.rival_weight:g} x the gap")
            reasons.append(score_against_threshold(score, threshold, ">=" if decision == MATCH else "<"))

        suggestions: tuple[Candidate, ...] = ()
        if decision == NO_MATCH and self.options.suggestions:
            suggestions = tuple(c for c in self._rank(latent, self.options.suggestions + 1, photo_cells)
                                if c.product_id != product_id)[: self.options.suggestions]
        return Verdict(
            decision=decision, product_id=product_id, score=score, threshold=threshold,
            estimated_far=self.estimated_far(score, second_look=first_score is not None), reasons=tuple(reasons),
            model_id=self.bundle.model_id, photo_sha256=capture.sha256, quality=capture.quality,
            near_duplicate=near_duplicate, suggestions=suggestions,
            target_far=self.bundle.target_far, judged_utc=utc_now(),
            bundle_id=self.bundle.bundle_id, first_score=first_score, first_threshold=first_threshold,
        )

    def identify(self, photo: ImageSource | np.ndarray | Capture, top_k: int = 5) -> list[Candidate]:
        """The ``top_k`` products the photo most resembles, best first. It ranks and does
        not judge the capture: before acting on a candidate, ask
        :meth:`retake_reasons` of the same :meth:`prepare`-d capture (too dark, blurred,
        a copy of the candidate's original ...), as ``auditlens identify`` does."""
        capture = photo if isinstance(photo, Capture) else self.prepare(photo)
        latent = self.embed(capture)
        return self._rank(latent, top_k, self._capture_cells(capture))
