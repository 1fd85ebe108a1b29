"""Cell matching: the encoder's 8 x 8 feature-map cells beside its pooled latent.

A model exported with cells (``auditlens export --cells``) gives two outputs: the latent,
and the last feature map's cells (8 x 8 of them at 128 px), each projected by the latent
layer's kernel, so that the cells average (plus the layer's bias) to the latent. The
latent was trained on the catalogue's products; the cells keep more of the pretrained
trunk's view of a package's print and layout, which a product added after training needs
(docs/ablation.md, "Scores against the whole catalogue, and the trunk's 8x8 cells").

**Cell score** of a photo against a reference: each of the photo's cells takes its best
cosine among the reference's cells; the mean over the photo's cells and views is the
score. A product's is its best reference's.

**Fused score**, the verifier's rule for a bundle that carries cells and a calibrated
``decision["cells"]["weight"]``::

    score = cosine + weight * (cell score - mean) / sd

the mean and standard deviation taken over the photo's cell scores against a fixed
**cohort** of originals: those of the catalogue the model was calibrated on, which travel
with the model card (``encoder.cohort.npy`` beside ``encoder.json``) into every bundle
enrolled with it, or a bundle's own originals when its model has no calibrated card. So a
product's score does not depend on what else a bundle holds: the 10-product sample scores
as the 61-product catalogue the threshold was calibrated on, and products added later
leave the others' scores alone. ``weight`` is ``auditlens calibrate --cells-weight`` (in
standard deviations of the calibration photos' cosines) times that spread; the score
stays a cosine moved by the cell term, so the second look's band reads as before.

A bundle stores each reference's cells, and the cohort's, as int8 unit vectors,
``round(127 * x)``, in ``cells.npy`` (R, C, D) and ``cohort.npy`` (K, C, D): 8 KiB a
reference for 64 cells of 128 components.
"""

from __future__ import annotations

import io

import numpy as np

from auditlens.device_app.search import best_per_product

CELLS_FILE = "cells.npy"
COHORT_FILE = "cohort.npy"
CELL_SCALE = 127.0
"""Unit cell components in [-1, 1] are stored as round(127 * x)."""

DEFAULT_SD_WEIGHT = 0.5
"""``calibrate --cells-weight``: the cell term's weight in standard deviations of the
calibration photos' cosines. Measured on the shipped model and three folds of held-out
products (docs/ablation.md): 0.5 keeps trained products' EER (6.2%) and lifts their top-1
to 80.1%, and takes new products' 3-fold mean EER from 18.7% to 17.0%; 1.0 does a little
more for new products (16.1%) and costs trained ones EER (6.4%) and cartons' EER."""

Z_LIMIT = 100.0
"""The largest cell z-score a threshold is set at: a cell score is at most 1, and on the
sample photos the cohort's spread is 0.025 or more (median 0.042), which puts even a
perfect cell score at z 26 or less; a threshold beyond ``1 + weight * Z_LIMIT`` is no
calibrated one."""

_REFERENCE_BLOCK = 256
"""References scored at a time: a (V*C, 256*C) float32 block is 8 MiB for 128 photo cells."""


def npy_bytes(array: np.ndarray) -> bytes:
    """``array`` as a ``.npy`` file's bytes (what a bundle stores and its sha256 covers)."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(array), allow_pickle=False)
    return buf.getvalue()


def quantize_cells(cells: np.ndarray) -> np.ndarray:
    """Unit cells (R, C, D) as a bundle stores them: int8, ``round(127 * x)``."""
    return np.clip(np.round(np.asarray(cells, dtype=np.float32) * CELL_SCALE), -127, 127).astype(np.int8)


def as_float_cells(cells: np.ndarray) -> np.ndarray:
    """Cells as unit float32: int8 ones scaled back, float32 ones as they are (no copy).
    Converting a bundle's cells once, not at every score, takes a verify's cell term
    from about 6 ms to 2 ms for a 61-original cohort (its cost is mostly the conversion)."""
    cells = np.asarray(cells)
    if cells.dtype == np.int8:
        return cells.astype(np.float32) * np.float32(1.0 / CELL_SCALE)
    return np.asarray(cells, dtype=np.float32)


FLOAT32_CELLS_BYTES = 64 * 1024**2
"""A bundle's cells are held converted to float32 (four times their int8 size) up to this
size: about 2,000 references of 64 cells; a larger catalogue's are converted a block at a
time when a photo is ranked against all of them."""


def held_for_scoring(cells: np.ndarray) -> np.ndarray:
    """A bundle's cells as scores read them best: float32 up to :data:`FLOAT32_CELLS_BYTES`,
    else as stored (int8)."""
    return as_float_cells(cells) if np.asarray(cells).nbytes * 4 <= FLOAT32_CELLS_BYTES else cells


def cell_scores(photo_cells: np.ndarray, reference_cells: np.ndarray) -> np.ndarray:
    """Cell score of each photo against each reference.

    Args:
        photo_cells: (N, V, C, D): N photos' V views of C cells each, unit floats or int8.
        reference_cells: (R, C', D) as the bundle stores them (int8) or unit floats.

    Returns float32 (N, R): for each photo cell its best cosine among the reference's
    cells, averaged over the photo's cells and views.
    """
    photos = as_float_cells(photo_cells)
    n, views, count, dim = photos.shape
    refs = np.asarray(reference_cells)
    flat = photos.reshape(n * views * count, dim)
    out = np.empty((n, len(refs)), dtype=np.float32)
    for start in range(0, len(refs), _REFERENCE_BLOCK):
        block = refs[start:start + _REFERENCE_BLOCK]
        rows = as_float_cells(block).reshape(-1, dim)
        # reference cells as rows: each photo cell's best match is then a max across rows,
        # which numpy runs about four times faster than along each row's 64 columns (a
        # verify's score step 3.1 -> 2.5 ms, timed in alternation; the same values)
        sims = (rows @ flat.T).reshape(len(block), block.shape[1], n, views * count)
        out[:, start:start + len(block)] = sims.max(axis=1).mean(axis=2).T
    return out


def product_cell_scores(photo_cells: np.ndarray, reference_cells: np.ndarray, owner: np.ndarray,
                        n_products: int) -> np.ndarray:
    """Each photo's cell score against every product (its best reference's): (N, P)."""
    return best_per_product(cell_scores(photo_cells, reference_cells), owner, n_products)


def score_ceiling(weight: float) -> float:
    """The highest threshold a calibration sets: a cosine of 1 plus the cell term at
    :data:`Z_LIMIT`."""
    return 1.0 + weight * Z_LIMIT


def fuse(cosines: np.ndarray, cells: np.ndarray, weight: float, cohort: np.ndarray) -> np.ndarray:
    """``cosines + weight * z`` (float32, the shape of ``cosines``): ``z`` is each photo's
    product cell scores ``cells`` (..., P) in standard deviations from the mean of its
    cell scores against the cohort, ``cohort`` (..., K). A cohort without spread (one
    original) leaves the cosine alone."""
    cells = np.asarray(cells, dtype=np.float64)
    cohort = np.asarray(cohort, dtype=np.float64)
    mean = cohort.mean(axis=-1, keepdims=True)
    sd = cohort.std(axis=-1, keepdims=True)
    z = np.divide(cells - mean, sd, out=np.zeros_like(cells), where=sd > 1e-9)
    return (np.asarray(cosines, dtype=np.float64) + weight * z).astype(np.float32)
