"""auditlens and the classical tools a user would otherwise pick, behind one interface.

Every method answers three questions: ``prepare_reference(product)`` (once per product,
at enrolment), ``prepare_query(photo_path)`` (once per field photo: decode and describe)
and ``score(reference, query)`` (a similarity: higher means more likely the same
product). ``verify(photo_path, reference)`` is what one verification costs on the phone:
prepare the query and score it (auditlens runs its whole ``Verifier.verify``, capture
quality and near-copy checks included).

All methods decode with the same Pillow loader (``auditlens`` ``load_image``, reduced
JPEG decoding down to the size the method works at), so the comparison is of the
methods, not of their image readers. OpenCV runs single-threaded like the encoder.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from auditlens.device_app.imaging import load_image


@dataclass(frozen=True)
class ProductRef:
    """What a method needs to know of a product to prepare its reference."""

    product_id: str
    image: str | bytes


class Method:
    """One verification method (see the module docstring)."""

    name = "method"
    describe = ""
    work_side = 256
    """Side the method works at; JPEGs are draft-decoded down to (at least) this."""
    references_from_bundle = False
    """True when :meth:`prepare_reference` reads a reference made earlier (no work to time)."""

    def setup(self) -> None:
        """Import and build what the method needs (not timed)."""

    def load(self, source) -> Image.Image:
        side = self.work_side
        return load_image(source, draft=(side, side))

    def prepare_reference(self, product: ProductRef):
        return self.describe_image(self.load(product.image))

    def prepare_query(self, photo) -> object:
        return self.describe_image(self.load(photo))

    def describe_image(self, image: Image.Image):
        raise NotImplementedError

    def score(self, reference, query) -> float:
        raise NotImplementedError

    def score_matrix(self, references: list, queries: list) -> np.ndarray:
        """Scores (N queries, P references), float64."""
        return np.array([[self.score(r, q) for r in references] for q in queries], dtype=np.float64)

    def verify(self, photo, reference) -> float:
        return self.score(reference, self.prepare_query(photo))

    def reference_bytes(self, reference) -> int:
        """Storage a prepared reference needs on the device."""
        if isinstance(reference, np.ndarray):
            return int(reference.nbytes)
        return int(getattr(reference, "nbytes", 0))


# -- perceptual hashes --------------------------------------------------------------------
class _ImageHash(Method):
    hash_fn = "phash"
    work_side = 64

    def setup(self) -> None:
        import imagehash

        self._fn = getattr(imagehash, self.hash_fn)

    def describe_image(self, image):
        return self._fn(image)  # an 8x8 = 64-bit hash

    def score(self, reference, query) -> float:
        return 1.0 - (reference - query) / 64.0

    def score_matrix(self, references, queries):
        ref = np.stack([r.hash.ravel() for r in references])  # (P, 64) bool
        qry = np.stack([q.hash.ravel() for q in queries])
        dist = (qry[:, None, :] != ref[None, :, :]).sum(-1)
        return 1.0 - dist / 64.0

    def reference_bytes(self, reference) -> int:
        return 8


class PHash(_ImageHash):
    name = "pHash"
    describe = "imagehash.phash, 64 bits; score = 1 - Hamming/64"
    hash_fn = "phash"


class DHash(_ImageHash):
    name = "dHash"
    describe = "imagehash.dhash, 64 bits; score = 1 - Hamming/64"
    hash_fn = "dhash"


# -- colour histogram ---------------------------------------------------------------------
class HSVHistogram(Method):
    name = "HSV histogram"
    describe = "OpenCV 8x8x8 HSV histogram of a 128 px copy; score = histogram intersection"
    work_side = 128

    def setup(self) -> None:
        import cv2

        cv2.setNumThreads(1)
        self._cv2 = cv2

    def describe_image(self, image):
        cv2 = self._cv2
        small = np.asarray(image.resize((128, 128), Image.Resampling.BILINEAR))
        hsv = cv2.cvtColor(small, cv2.COLOR_RGB2HSV)
        hist = cv2.calcHist([hsv], [0, 1, 2], None, [8, 8, 8], [0, 180, 0, 256, 0, 256]).ravel()
        return (hist / max(hist.sum(), 1.0)).astype(np.float32)

    def score(self, reference, query) -> float:
        return float(np.minimum(reference, query).sum())

    def score_matrix(self, references, queries):
        ref = np.stack(references)
        return np.stack([np.minimum(ref, q[None]).sum(1) for q in queries]).astype(np.float64)


# -- structural similarity -----------------------------------------------------------------
class SSIM(Method):
    name = "SSIM"
    describe = "scikit-image structural_similarity of 128x128 grey copies"
    work_side = 128

    def setup(self) -> None:
        from skimage.metrics import structural_similarity

        self._ssim = structural_similarity

    def describe_image(self, image):  # uint8, as a device would store it (SSIM computes in float)
        return np.asarray(image.convert("L").resize((128, 128), Image.Resampling.BILINEAR), dtype=np.uint8)

    def score(self, reference, query) -> float:
        return float(self._ssim(reference, query, data_range=255.0))


# -- local features + RANSAC --------------------------------------------------------------
class _Features(Method):
    work_side = 480
    nfeatures = 500
    ratio = 0.75

    def setup(self) -> None:
        import cv2

        cv2.setNumThreads(1)
        self._cv2 = cv2
        self._detector = self._make_detector()
        self._matcher = cv2.BFMatcher(self._norm())

    def load(self, source) -> Image.Image:
        """Draft-decoded until the *longer* side is at least :attr:`work_side`, the side
        :meth:`describe_image` brings it to (a square draft box would keep the shorter
        side at ``work_side`` too: a 4032x3024 JPEG at 1/4 scale instead of 1/8)."""
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            scale = self.work_side / max(image.size)  # the header's size: nothing decoded yet
            box = (max(1, math.ceil(image.width * scale)), max(1, math.ceil(image.height * scale)))
        return load_image(source, draft=box)

    def describe_image(self, image):
        grey = image.convert("L")
        scale = self.work_side / max(grey.size)
        if scale < 1:
            grey = grey.resize((round(grey.width * scale), round(grey.height * scale)),
                               Image.Resampling.BILINEAR)
        keypoints, descriptors = self._detector.detectAndCompute(np.asarray(grey), None)
        points = np.float32([k.pt for k in keypoints]).reshape(-1, 2)
        return points, descriptors

    def score(self, reference, query) -> float:
        """Number of RANSAC homography inliers among ratio-test matches."""
        cv2 = self._cv2
        (ref_pts, ref_desc), (q_pts, q_desc) = reference, query
        if ref_desc is None or q_desc is None or len(ref_desc) < 2 or len(q_desc) < 2:
            return 0.0
        good = [m for m, n in (p for p in self._matcher.knnMatch(q_desc, ref_desc, k=2) if len(p) == 2)
                if m.distance < self.ratio * n.distance]
        if len(good) < 4:
            return float(len(good)) / 10.0  # below any inlier count, keeps an order
        src = q_pts[[m.queryIdx for m in good]]
        dst = ref_pts[[m.trainIdx for m in good]]
        _, mask = cv2.findHomography(src, dst, cv2.RANSAC, 5.0)
        return float(mask.sum()) if mask is not None else 0.0

    def reference_bytes(self, reference) -> int:
        """Keypoints as float32 x, y; descriptors one byte a value (ORB's are bits packed in
        bytes; OpenCV's SIFT descriptors are whole numbers 0..255 held in float32, which a
        device would store as uint8 without loss)."""
        points, descriptors = reference
        return int(points.nbytes + (descriptors.size if descriptors is not None else 0))


class ORB(_Features):
    name = "ORB + RANSAC"
    describe = "OpenCV ORB (500 features, longer side brought down to 480 px), ratio test 0.75, homography RANSAC inliers"

    def _make_detector(self):
        return self._cv2.ORB_create(nfeatures=self.nfeatures)

    def _norm(self):
        return self._cv2.NORM_HAMMING


class SIFT(_Features):
    name = "SIFT + RANSAC"
    describe = "OpenCV SIFT (500 features, longer side brought down to 480 px), ratio test 0.75, homography RANSAC inliers"

    def _make_detector(self):
        return self._cv2.SIFT_create(nfeatures=self.nfeatures)

    def _norm(self):
        return self._cv2.NORM_L2


# -- auditlens ----------------------------------------------------------------------------
class Auditlens(Method):
    """The product itself: the bundle's int8 encoder, scored as the verifier scores (the
    cosine to the best reference, plus the cell term of a bundle that weighs cells, less
    the rival term of one that weighs rivals: both look beyond the pair, at a cohort of
    originals and at the photo's best other product)."""

    name = "auditlens"
    describe = ("int8 TFLite encoder (1 thread), the verifier's score: the cosine plus the bundle's "
                "cell term (standardised against a cohort of originals) less its rival term (what the "
                "photo's best other product beats the claim by)")
    references_from_bundle = True

    def __init__(self, bundle_path) -> None:
        self.bundle_path = bundle_path

    def setup(self) -> None:
        from auditlens.device_app.verifier import Verifier, VerifierOptions

        self.verifier = Verifier(self.bundle_path, VerifierOptions(num_threads=1))

    def prepare_reference(self, product: ProductRef):
        bundle = self.verifier.bundle
        rows = list(bundle.product(product.product_id).references)
        return product.product_id, bundle.references[rows]

    def prepare_query(self, photo):
        capture = self.verifier.prepare(photo, keep_image=False)
        self.verifier.embed(capture)
        capture.release_pixels()  # the latent (and cells) stay
        return capture

    def score(self, reference, query) -> float:
        return self.verifier.score(query.latent, reference[0], query.cells)

    def score_matrix(self, references, queries):
        rows = [self.verifier.bundle.index(r[0]) for r in references]
        return np.stack([self.verifier.product_scores(q.latent, q.cells)[rows] for q in queries]).astype(np.float64)

    def verify(self, photo, reference) -> float:
        return self.verifier.verify(photo, reference[0]).score

    def reference_bytes(self, reference) -> int:
        rows, dim = reference[1].shape
        cells = self.verifier.bundle.cells
        return int(rows * dim * 2 + (rows * cells.shape[1] * dim if cells is not None else 0))  # float16, int8


PEERS = (PHash, DHash, HSVHistogram, SSIM, ORB, SIFT)
METHOD_NAMES = tuple(cls.name for cls in PEERS) + (Auditlens.name,)


def unknown_methods(names: list[str]) -> list[str]:
    """The ``names`` that are no method's name prefix (case-insensitive)."""
    return [n for n in names if not any(m.lower().startswith(n.lower()) for m in METHOD_NAMES)]


def make_methods(bundle_path, names: list[str] | None = None) -> list[Method]:
    """Every method (peers first, auditlens last), or those whose names are given
    (case-insensitive prefixes: ``sift``, ``orb``, ``phash`` ...)."""
    methods: list[Method] = [cls() for cls in PEERS] + [Auditlens(bundle_path)]
    if names:
        wanted = [n.lower() for n in names]
        methods = [m for m in methods if any(m.name.lower().startswith(w) for w in wanted)]
    return methods
