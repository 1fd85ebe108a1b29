"""Fast ``identify`` over large catalogues: compact latents and a top-k scan.

A bundle keeps its reference latents as float16 (2 bytes a component, as stored);
numpy has no half-precision BLAS, so an exact score converts rows to float32 a block at
a time (:func:`cosines`). :class:`ReferenceSearch` is what the verifier ranks products
with: a small catalogue is scored whole from a float32 copy; a large one is scanned in
int8 and only a shortlist of products is scored exactly, so 100,000 products hold 38.4 MB
of latents (float16 + int8) instead of the 51.2 MB of float32 and are ranked about as
fast as a float32 scan would.

:class:`LatentIndex` stores unit latents compactly and finds the best products with one
scan and ``argpartition``:

``float32``  4 bytes per component, one BLAS matrix-vector product (exact).
``float16``  2 bytes per component; scanned in cache-sized chunks converted to float32
             (numpy has no half-precision BLAS, so this is the slowest scan).
``int8``     1 byte per component, ``round(127 * x)``, stored transposed (D, R) and
             scanned column by column with an int16 accumulator. For unit rows and a unit
             query no partial sum can exceed ``(127 + sqrt(D) / 2) ** 2`` (< 32767 for
             D <= 11000), so the int16 sum never overflows. The best candidates are then
             re-scored against the unquantized query, which halves the quantization error.

Products with several reference rows get the best row's score (rows are grouped by
product once, at build time, so the reduction is one ``np.maximum.reduceat``).
"""

from __future__ import annotations

import numpy as np

DTYPES = ("float32", "float16", "int8")

INT8_SCALE = 127.0
"""Unit-latent components in [-1, 1] are stored as round(127 * x)."""

_CHUNK = 16384
"""Rows converted to float32 at a time (:func:`cosines`, index building; fits in L2 with
D <= 128)."""

_INT8_BLOCK = 131072
"""Rows per block of the int8 scan: a 256 KiB int16 accumulator and product stay cached."""


def _check_rows(latents: np.ndarray) -> np.ndarray:
    x = np.asarray(latents)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0 or x.dtype.kind not in "fiu":
        raise ValueError(f"latents must be a non-empty (R, D) array of numbers, not shape {x.shape} "
                         f"of {x.dtype}")
    return x


def _unit_blocks(latents: np.ndarray, order: np.ndarray | None = None):
    """(start, stop, unit float32 rows) of ``latents[order]``, :data:`_CHUNK` rows at a
    time: a float16 catalogue is never held as float32 all at once."""
    for start in range(0, len(latents), _CHUNK):
        stop = min(start + _CHUNK, len(latents))
        block = np.asarray(latents[start:stop] if order is None else latents[order[start:stop]],
                           dtype=np.float32)
        yield start, stop, block / np.maximum(np.linalg.norm(block, axis=1, keepdims=True), 1e-12)


def cosines(latents: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``latents @ rows.T`` in float32, (..., R): rows of any float type (a bundle's are
    float16) converted :data:`_CHUNK` at a time into one reused buffer, each score the
    float32 dot product of the row as stored (BLAS may round the last bit differently for
    another number of rows), kept within -1..1: a float16 row of the photo's own latent
    gives 1.00005, which no cosine is."""
    rows = np.asarray(rows)
    q = np.asarray(latents, dtype=np.float32)
    if rows.dtype == np.float32:
        return np.clip(q @ rows.T, -1.0, 1.0)
    out = np.empty((*q.shape[:-1], len(rows)), dtype=np.float32)
    buf = np.empty((min(_CHUNK, len(rows)), rows.shape[1]), dtype=np.float32)
    for start in range(0, len(rows), _CHUNK):
        stop = min(start + _CHUNK, len(rows))
        block = buf[: stop - start]
        block[...] = rows[start:stop]
        out[..., start:stop] = q @ block.T
    return np.clip(out, -1.0, 1.0, out=out)


def best_reference_scores(latents: np.ndarray, references: np.ndarray, owner: np.ndarray,
                          n_products: int) -> np.ndarray:
    """Best cosine of a latent (D,) or of each of latents (N, D) against every product's
    references (rows of ``references``, ``owner`` naming each row's product): (P,) or
    (N, P). The verifier's rule, shared by evaluation and the bench."""
    return best_per_product(cosines(latents, references), owner, n_products)


def best_per_product(sims: np.ndarray, owner: np.ndarray, n_products: int) -> np.ndarray:
    """Each product's best of its reference rows' scores: (..., R) -> (..., P)."""
    best = np.full((*sims.shape[:-1], n_products), -np.inf, dtype=np.float32)
    if len(owner) == n_products and (np.bincount(owner, minlength=n_products) == 1).all():
        best[..., owner] = sims  # one reference per product
    else:
        np.maximum.at(best.T, owner, sims.T)  # along the last axis, in place
    return best


class LatentIndex:
    """Unit latents of a catalogue, stored as ``dtype``, ranked by cosine.

    Args:
        latents: (R, D) latents, one row per reference image (normalised here).
        owners: (R,) product index of each row; default: row i is product i.
        dtype: ``'float32'``, ``'float16'`` or ``'int8'``.
        rerank: for ``int8``, how many best rows (at least) to re-score against the
            unquantized query before the final top-k.
    """

    def __init__(self, latents: np.ndarray, owners: np.ndarray | None = None,
                 dtype: str = "int8", rerank: int = 64) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
        x = _check_rows(latents)
        rows, self.dim = x.shape
        if dtype == "int8" and self.dim > 11_000:
            raise ValueError(f"{self.dim}-d latents could overflow the int16 accumulator; use float16")
        self.dtype = dtype
        self.rerank = max(1, int(rerank))
        self._starts: np.ndarray | None = None
        order = None
        if owners is None:
            self.num_products = rows
            self._row_owner = np.arange(rows, dtype=np.int32)
        else:
            owners = np.asarray(owners, dtype=np.int64)
            if owners.shape != (rows,) or (owners < 0).any():
                raise ValueError("owners must give a non-negative product index for every row")
            order = np.argsort(owners, kind="stable")
            sorted_owners = owners[order]
            present = np.unique(sorted_owners)
            if len(present) != int(sorted_owners[-1]) + 1:
                raise ValueError("every product index 0..P-1 needs at least one row")
            self.num_products = len(present)
            if self.num_products != rows:
                self._starts = np.flatnonzero(np.r_[True, sorted_owners[1:] != sorted_owners[:-1]])
            self._row_owner = sorted_owners.astype(np.int32)
        self.rows = rows
        # rows grouped by product, normalised and stored a block at a time
        if dtype == "int8":
            self._data = np.empty((self.dim, rows), dtype=np.int8)  # (D, R)
        else:
            self._data = np.empty((rows, self.dim), dtype=dtype)
        for start, stop, block in _unit_blocks(x, order):
            if dtype == "int8":
                self._data[:, start:stop] = np.clip(np.round(block * INT8_SCALE), -127, 127).T
            else:
                self._data[start:stop] = block

    # -- size ---------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes held by the stored latents."""
        return int(self._data.nbytes)

    # -- scanning -----------------------------------------------------------------
    def _query(self, query: np.ndarray) -> np.ndarray:
        q = np.asarray(query, dtype=np.float32).reshape(-1)
        if q.shape[0] != self.dim:
            raise ValueError(f"query has {q.shape[0]} components, the index holds {self.dim}-d latents")
        return q / max(float(np.linalg.norm(q)), 1e-12)

    def _scan_int16(self, q: np.ndarray) -> np.ndarray:
        """Quantized dot products (scaled by 127**2), int16 (R,), in stored row order.

        Rows are scanned in blocks of :data:`_INT8_BLOCK` so that the accumulator and the
        product stay in the CPU cache across the D column passes (2x faster at 1M rows)."""
        q8 = np.clip(np.round(q * INT8_SCALE), -127, 127).astype(np.int16)
        columns = [(j, q8[j]) for j in range(self.dim) if q8[j]]
        acc = np.zeros(self.rows, dtype=np.int16)
        tmp = np.empty(min(self.rows, _INT8_BLOCK), dtype=np.int16)
        for start in range(0, self.rows, _INT8_BLOCK):
            stop = min(start + _INT8_BLOCK, self.rows)
            block, prod = acc[start:stop], tmp[: stop - start]
            for j, weight in columns:
                np.multiply(self._data[j, start:stop], weight, out=prod, casting="unsafe")
                block += prod
        return acc

    def _row_scores(self, q: np.ndarray) -> np.ndarray:
        """Cosine of every stored row (approximate for int8), float32, stored order."""
        if self.dtype == "int8":
            return self._scan_int16(q).astype(np.float32) * (1.0 / INT8_SCALE**2)
        return cosines(q, self._data)

    def _exact_rows(self, rows: np.ndarray, q: np.ndarray) -> np.ndarray:
        """Re-score stored rows against the unquantized query."""
        if self.dtype == "int8":
            return (self._data[:, rows].T.astype(np.float32) @ q) * (1.0 / INT8_SCALE)
        return cosines(q, self._data[rows])

    def product_scores(self, query: np.ndarray) -> np.ndarray:
        """Best cosine of ``query`` against each product's rows, float32 (P,)."""
        sims = self._row_scores(self._query(query))
        if self._starts is None:
            return sims
        return np.maximum.reduceat(sims, self._starts)

    def top_k(self, query: np.ndarray, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` products most similar to ``query``: (product indices, cosines),
        best first."""
        q = self._query(query)
        sims = self._row_scores(q)
        k = max(0, min(int(k), self.num_products))
        if k == 0:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
        # candidate rows: enough that k distinct products survive, plus re-rank slack
        want = max(k * (1 if self._starts is None else 4), self.rerank if self.dtype == "int8" else k)
        want = min(self.rows, want)
        while True:
            cand = np.argpartition(-sims, want - 1)[:want] if want < self.rows else np.arange(self.rows)
            exact = self._exact_rows(cand, q) if self.dtype == "int8" else sims[cand]
            owners = self._row_owner[cand]
            order = np.argsort(-exact, kind="stable")
            owners, exact = owners[order], exact[order]
            _, first = np.unique(owners, return_index=True)
            if len(first) >= k or want >= self.rows:
                first = np.sort(first)[:k]
                return owners[first].astype(np.int64), exact[first].astype(np.float32)
            want = min(self.rows, want * 4)

    @classmethod
    def from_bundle(cls, bundle, dtype: str = "int8") -> LatentIndex:
        """An index over a loaded :class:`~auditlens.device_app.bundle.ReferenceBundle`."""
        return cls(bundle.references, bundle.reference_owner, dtype=dtype)


FLOAT32_COPY_BYTES = 16 << 20
"""Up to this many bytes of float32 latents (32,768 rows of 128-d) :class:`ReferenceSearch`
keeps a float32 copy of the references and scores every row with one BLAS product (as
fast as the int8 shortlist at that size, 10x faster than it for a few thousand rows);
above it an int8 index shortlists and only the shortlisted rows are converted and scored."""

SHORTLIST = 64
"""Products the int8 scan hands to the exact scores first."""

INT8_MARGIN = 0.02
"""How far an int8 product score may be taken to lie below the exact one. The rounding of
stored rows and query to 1/127 moves a cosine by about 0.003 (one standard deviation at
128-d), so 0.02 is over six; a hard worst case (0.09 at 128-d) would shortlist nearly
every product. The shortlist grows until its k-th exact score leads every product left
out by this margin."""


def check_top_k(k) -> int:
    """``k`` of a top-k as an int; ValueError unless a whole number of at least 1."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"top_k must be a whole number of at least 1, not {k!r}")
    return int(k)


def top_of(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` best ``scores``, best first; equal scores in index order."""
    return np.lexsort((np.arange(len(scores)), -scores))[:k]


class ReferenceSearch:
    """Ranks a bundle's products for a latent with the verifier's exact scores.

    A small catalogue (up to :data:`FLOAT32_COPY_BYTES` as float32) is scored whole from a
    float32 copy. A larger one is scanned once in int8 (:class:`LatentIndex`, one more
    byte a component); the :data:`SHORTLIST` best products by that scan are scored
    exactly from the float16 references, and the shortlist grows (x4) while a product
    left out could, within :data:`INT8_MARGIN`, still beat the k-th. The result is the
    full scan's unless an int8 score is more than the margin off (not seen in the bench
    or the tests); products with equal exact scores are listed in product order (among
    the shortlisted, for a large catalogue).

    Args:
        references: (R, D) unit rows as the bundle holds them (float16), kept, not copied.
        owner: (R,) product index of each row.
        n_products: P.
    """

    def __init__(self, references: np.ndarray, owner: np.ndarray, n_products: int, *,
                 float32_copy_bytes: int = FLOAT32_COPY_BYTES, shortlist: int = SHORTLIST) -> None:
        self.references = _check_rows(references)
        self.owner = np.asarray(owner, dtype=np.int32)
        self.num_products = int(n_products)
        self.shortlist = max(1, int(shortlist))
        rows, dim = self.references.shape
        self.index = None
        # the rows every exact score is computed from: a float32 copy (exact: float16 values
        # convert without rounding) of a small catalogue, the float16 rows of a large one
        self._scored = self.references
        if rows * dim * 4 <= float32_copy_bytes:
            self._scored = np.asarray(self.references, dtype=np.float32)
        else:
            self.index = LatentIndex(self.references, self.owner, dtype="int8")
            order = np.argsort(self.owner, kind="stable").astype(np.int32)
            bounds = np.searchsorted(self.owner[order], np.arange(self.num_products + 1))
            # rows of product p: order[bounds[p]:bounds[p + 1]]
            self._order, self._bounds = order, bounds.astype(np.int32)

    @property
    def nbytes(self) -> int:
        """Bytes of latents held: the references and their float32 copy or int8 index."""
        extra = self.index.nbytes if self.index is not None else self._scored.nbytes
        return int(self.references.nbytes) + int(extra)

    def product_scores(self, latent: np.ndarray) -> np.ndarray:
        """Exact best cosine of ``latent`` against every product, float32 (P,)."""
        return best_reference_scores(latent, self._scored, self.owner, self.num_products)

    def best_of_rows(self, latent: np.ndarray, rows) -> float:
        """Exact best cosine of ``latent`` against reference ``rows`` (one product's)."""
        return float(cosines(latent, self._scored[rows]).max())

    def _scores_of(self, products: np.ndarray, latent: np.ndarray) -> np.ndarray:
        """Exact best cosine of ``latent`` against each of ``products``."""
        starts, stops = self._bounds[products], self._bounds[products + 1]
        rows = self._order[np.concatenate([np.arange(a, b) for a, b in zip(starts, stops)])]
        sims = cosines(latent, self._scored[rows])
        return np.maximum.reduceat(sims, np.r_[0, np.cumsum(stops - starts)[:-1]])

    def top_k(self, latent: np.ndarray, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` best products for ``latent``: (product indices, exact cosines), best
        first; equal scores in product order."""
        k = min(check_top_k(k), self.num_products)
        if self.index is None:
            scores = self.product_scores(latent)
            kth = np.partition(scores, self.num_products - k)[self.num_products - k]
            cand = np.flatnonzero(scores >= kth)  # every product tied with the k-th too
            exact = scores[cand]
        else:
            approx = self.index.product_scores(latent)
            n = max(k, self.shortlist)
            while True:
                cand = (np.argpartition(-approx, n - 1)[:n] if n < self.num_products
                        else np.arange(self.num_products))
                exact = self._scores_of(cand, latent)
                if len(cand) == self.num_products:
                    break
                kth = np.partition(exact, len(exact) - k)[len(exact) - k]
                if kth >= approx[cand].min() + INT8_MARGIN:
                    break  # nothing left out scores within the margin of the k-th
                n *= 4
        best = np.lexsort((cand, -exact))[:k]  # by score, then product index
        return cand[best].astype(np.int64), exact[best]
