"""auditlens' evaluation protocol, shared by ``evaluate`` and ``calibrate`` so that
every figure auditlens reports is measured the same way.

For each labelled photo of an enrolled product:

* **genuine**: the photo against its own product;
* **impostor**: against ``n_impostors`` (3) products drawn at random from *other* groups
  (the catalogue's ``group``; grocery-dev's coarse classes); the draw depends only on the
  seed and the photo's file name and product (not the folder it sits in, so the same
  photos give the same figures on any machine), and adding photos never changes another
  photo's pairs;
* **hard**: against *every other* product of its own group (another brand of
  milk). Products with an empty ``group`` have no hard impostors, and draw their random
  impostors from all other products.

A pair's score is the cosine between the photo's latent and the product's closest
reference, plus the cell term for a bundle that weighs cells (the verifier's rule,
:mod:`auditlens.device_app.cells`). Each photo is decoded and embedded once, with the
bundle's own model and preprocessing (``Verifier.prepare``), and scored against the
whole bundle at once, which also gives the identification ranks.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from auditlens.catalog import Catalog, LabelledPhoto
from auditlens.device_app.cells import (
    as_float_cells,
    cell_scores,
    fuse,
    held_for_scoring,
    product_cell_scores,
    quantize_cells,
)
from auditlens.device_app.preprocess import moved_views, pool_views
from auditlens.device_app.rivals import best_rivals, penalise, rival_shortlist
from auditlens.device_app.search import best_reference_scores
from auditlens.errors import AuditlensError
from auditlens.files import file_sha256

GENUINE, IMPOSTOR, HARD = "genuine", "impostor", "hard"

COPY_SCORE = 0.999
"""A pair scoring this high scores as an image does against itself: a photo against its
own product is almost surely one of its references (enroll --references), an impostor pair
shows one image enrolled under two products, or an encoder that maps everything to one point."""

PROTOCOL_VERSION = 2
"""2: impostors drawn by the photo's file name (1: by its path as given)."""
N_IMPOSTORS = 3
DEFAULT_SEED = 0
IMPOSTOR_DRAWS = 20
"""Draws of the random impostors (seeds ``seed`` ..) that ``calibrate`` pools and whose
spread ``evaluate`` reports."""


@dataclass
class Embedded:
    """Labelled photos embedded against a bundle."""

    photos: list[LabelledPhoto]
    """The photos that could be used, in input order."""
    latents: np.ndarray
    """float32 (N, D) unit latents."""
    truth: np.ndarray
    """int (N,): index into the bundle's products of each photo's product."""
    scores: np.ndarray
    """float32 (N, P): the verifier's score of each photo against every product (the
    best-reference cosine, plus the cell term of a bundle that weighs cells)."""
    failed: list[tuple[str, str]] = field(default_factory=list)
    """(photo, reason) of photos that could not be decoded."""
    not_enrolled: list[LabelledPhoto] = field(default_factory=list)
    """Photos whose product is not in the bundle (cannot be scored)."""
    repeated: list[LabelledPhoto] = field(default_factory=list)
    """Rows showing the image (same bytes) and product an earlier row did: counted once."""
    contradictory: list[LabelledPhoto] = field(default_factory=list)
    """Rows whose image (same bytes) other rows label with another product: all left out,
    since one of the labels is wrong and the image would count as its own impostor."""
    second_scores: np.ndarray | None = None
    """float32 (N, P): the scores of a second look (the photos' views and their moved
    copies, :mod:`auditlens.device_app.second_look`), when one was embedded."""
    pair_scores: np.ndarray | None = None
    """(N, P): the scores pairs take when not ``scores``: the verdicts' decision scores
    (:meth:`SecondLook.decision_scores`). Identification ranks ``scores``."""
    cell_scores: np.ndarray | None = None
    """float32 (N, P): each photo's cell score against every product, for a bundle with
    cells (:mod:`auditlens.device_app.cells`)."""
    cohort_scores: np.ndarray | None = None
    """float32 (N, K): the same against the bundle's cohort."""
    cosines: np.ndarray | None = None
    """float32 (N, P): the best-reference cosines alone, when ``scores`` add a cell term."""
    second_cosines: np.ndarray | None = None
    """The same for ``second_scores``."""

    def weighed(self, cells_weight: float, rival_weight: float = 0.0) -> Embedded:
        """The same photos scored with the cell term at ``cells_weight`` (0: cosines alone)
        and the rival term at ``rival_weight`` (:mod:`auditlens.device_app.rivals`; 0: none).
        A second look's scores lose to the first look's rivals, as the verifier's do."""
        if cells_weight and self.cell_scores is None:
            raise ValueError("these photos were embedded against a bundle without cells")
        cosines = self.scores if self.cosines is None else self.cosines
        second = self.second_scores if self.second_cosines is None else self.second_cosines
        if self.cell_scores is None:
            scores, second_scores = cosines, second
        else:
            cells, cohort = self.cell_scores, self.cohort_scores
            scores = fuse(cosines, cells, cells_weight, cohort)
            second_scores = None if second is None else fuse(second, cells, cells_weight, cohort)
        if rival_weight:
            rivals = best_rivals(scores, rival_shortlist(cosines))
            scores = penalise(scores, rivals, rival_weight)
            second_scores = None if second_scores is None else penalise(second_scores, rivals, rival_weight)
        return replace(self, scores=scores, cosines=cosines, second_scores=second_scores,
                       second_cosines=second, pair_scores=None)


@dataclass
class Pairs:
    """The protocol's pairs, as parallel arrays."""

    photo: np.ndarray
    """int (M,): index into ``Embedded.photos``."""
    product: np.ndarray
    """int (M,): index into the bundle's products."""
    kind: np.ndarray
    """str (M,): 'genuine', 'impostor' or 'hard'."""
    score: np.ndarray
    """float32 (M,)."""

    @property
    def genuine(self) -> np.ndarray:
        return self.kind == GENUINE

    @property
    def impostor(self) -> np.ndarray:
        """Every impostor pair, random and hard."""
        return self.kind != GENUINE

    def subset(self, mask: np.ndarray) -> Pairs:
        return Pairs(self.photo[mask], self.product[mask], self.kind[mask], self.score[mask])

    def counts(self) -> dict[str, int]:
        return {GENUINE: int(self.genuine.sum()), IMPOSTOR: int((self.kind == IMPOSTOR).sum()),
                HARD: int((self.kind == HARD).sum())}


def embed_photos(verifier, photos: Sequence[LabelledPhoto], *, batch_size: int = 32,
                 workers: int | None = None, progress: bool = True, desc: str = "photos",
                 second_look_shift: float = 0.0) -> Embedded:
    """Decode (in threads) and embed (in batches) each photo once with the verifier's model.

    ``second_look_shift``: also embed each photo's views moved by that shift
    (:func:`~auditlens.device_app.preprocess.moved_views`) and fill ``second_scores``.

    Photos that cannot be decoded are listed in ``failed``, photos of products the
    bundle does not hold in ``not_enrolled``, rows repeating an earlier row's image (the
    same bytes, under any name: an audit-log export names each verification's photo
    anew) and product in ``repeated`` (each photo counts once), and rows whose image other
    rows label with another of the bundle's products in ``contradictory`` (left out);
    none stops the run.
    """
    from tqdm import tqdm

    bundle = verifier.bundle
    usable: list[LabelledPhoto] = []
    not_enrolled: list[LabelledPhoto] = []
    repeated: list[LabelledPhoto] = []
    known = {p.product_id for p in bundle.products}
    keys = [content_key(photo) for photo in photos]
    labels: dict[str, set[str]] = {}  # the bundle's products each image is labelled with
    for photo, key in zip(photos, keys):
        if photo.product_id in known:
            labels.setdefault(key, set()).add(photo.product_id)
    contradictory = [p for p, key in zip(photos, keys) if len(labels.get(key, ())) > 1]
    seen: set[tuple[str, str]] = set()
    for photo, key in zip(photos, keys):
        if len(labels.get(key, ())) > 1:
            continue
        if (key, photo.product_id) in seen:
            repeated.append(photo)
            continue
        seen.add((key, photo.product_id))
        (usable if photo.product_id in known else not_enrolled).append(photo)

    def load(photo: LabelledPhoto):
        try:
            if not second_look_shift:
                return verifier.prepare(photo.photo, keep_image=False).views
            capture = verifier.prepare(photo.photo)
            return np.concatenate([capture.views, moved_views(capture.image, verifier.spec, second_look_shift)])
        except AuditlensError as exc:
            return exc
        except OSError as exc:  # e.g. the file vanished
            return exc

    workers = workers or min(4, os.cpu_count() or 1)
    views = verifier.spec.num_views * (5 if second_look_shift else 1)
    inputs: list[np.ndarray] = []
    kept: list[LabelledPhoto] = []
    failed: list[tuple[str, str]] = []
    latents: list[np.ndarray] = []
    scored_cells: list[tuple[np.ndarray, np.ndarray]] = []  # (batch, P), (batch, K), for a bundle with cells

    if bundle.cells is not None:  # converted once, not at every batch
        reference_cells, cohort_cells = held_for_scoring(bundle.cells), as_float_cells(bundle.cohort)

    def run(batch: list[np.ndarray]) -> None:
        images = np.concatenate(batch)
        if bundle.cells is None:
            latents.append(verifier.encoder.embed(images, batch_size=batch_size))
            return
        lat, cells = verifier.encoder.embed_with_cells(images, batch_size=batch_size)
        latents.append(lat)
        first = quantize_cells(cells.reshape(len(batch), views, *cells.shape[1:])[:, :verifier.spec.num_views])
        scored_cells.append((product_cell_scores(first, reference_cells, bundle.reference_owner, len(bundle.products)),
                             cell_scores(first, cohort_cells)))
    bar = tqdm(total=len(usable), desc=desc, unit="img", disable=not progress)
    with ThreadPoolExecutor(workers) as pool:
        for photo, result in zip(usable, pool.map(load, usable)):
            bar.update(1)
            if isinstance(result, Exception):
                failed.append((photo.photo, str(result)))
                continue
            kept.append(photo)
            inputs.append(result)
            if len(inputs) == batch_size:
                run(inputs)
                inputs = []
    if inputs:
        run(inputs)
    bar.close()
    dim = bundle.references.shape[1]
    per_view = (np.concatenate(latents).reshape(len(kept), -1, dim) if latents
                else np.zeros((0, views, dim), np.float32))  # (photos, views, D)

    def scored(of_views: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each photo's pooled latent of these views, and its scores."""
        pooled = pool_views(of_views.reshape(-1, dim), of_views.shape[1]) if len(of_views) else of_views[:, 0]
        return pooled, best_reference_scores(pooled, bundle.references, bundle.reference_owner, len(bundle.products))

    lat, scores = scored(per_view[:, :verifier.spec.num_views])
    truth = np.array([bundle.index(p.product_id) for p in kept], dtype=np.int64)
    second = scored(per_view)[1] if second_look_shift else None
    embedded = Embedded(kept, lat, truth, scores, failed, not_enrolled, repeated, contradictory, second)
    if bundle.cells is None:
        return embedded.weighed(0.0, verifier.rival_weight) if verifier.rival_weight else embedded
    embedded.cell_scores, embedded.cohort_scores = (
        (np.concatenate([s[k] for s in scored_cells]) for k in (0, 1)) if scored_cells
        else (np.zeros((0, len(bundle.products)), np.float32), np.zeros((0, len(bundle.cohort)), np.float32)))
    return embedded.weighed(verifier.cells_weight, verifier.rival_weight)


def contradictory_note(rows: Sequence[LabelledPhoto]) -> str:
    """A warning naming rows whose image is labelled with two products (left out)."""
    names = sorted({os.path.basename(str(p.photo)) for p in rows})
    return (f"{len(rows)} photo rows show an image that another row labels with another product "
            f"(the same bytes; e.g. {', '.join(names[:3])}): one label is wrong, so all of them "
            "were left out; correct the labels")


def not_enrolled_note(rows: Sequence[LabelledPhoto], bundle) -> str:
    """A warning naming the products of photos the bundle does not hold (skipped), with the
    bundle's id each is most likely a misspelling of (case, a plural)."""
    counts = Counter(str(p.product_id) for p in rows)
    named = []
    for product_id, n in counts.most_common(5):
        near = bundle.near_id(product_id)
        named.append(f"{product_id!r} ({n} photo{'s' if n != 1 else ''}"
                     + (f"; did you mean {near!r}?)" if near else ")"))
    more = f" and {len(counts) - 5} more" if len(counts) > 5 else ""
    return (f"{_photos(len(rows))} of products not in the bundle {'was' if len(rows) == 1 else 'were'} "
            f"skipped: {', '.join(named)}{more}")


def unreadable_note(failed: Sequence[tuple[str, str]], listed_in: str = "", *, file_names: bool = False) -> str:
    """A warning naming the first photos that could not be read (skipped), with why; with
    ``file_names`` their file names alone (for a manifest, which travels to the devices:
    no folder of the calibrating machine, no error text quoting it)."""
    if file_names:
        named = ", ".join(Path(path).name for path, _ in failed[:3])
    else:
        named = "; ".join(error if error.startswith(str(path)) else f"{path}: {error}"  # errors name their image
                          for path, error in failed[:3])
    more = f"; and {len(failed) - 3} more" if len(failed) > 3 else ""
    return (f"{_photos(len(failed))} could not be read and {'was' if len(failed) == 1 else 'were'} "
            f"skipped: {named}{more}{listed_in}")


def _photos(n: int) -> str:
    return f"{n} photo{'s' if n != 1 else ''}"


def content_key(photo: LabelledPhoto) -> str:
    """What identifies a photo's image: the sha256 of its bytes, else (a file that cannot
    be read now: its decoding reports that) its real path."""
    try:
        return "sha256:" + file_sha256(photo.photo)
    except (OSError, TypeError, ValueError):
        return "path:" + os.path.realpath(photo.photo)


def _photo_rng(seed: int, photo: LabelledPhoto) -> np.random.Generator:
    name = os.path.basename(str(photo.photo).replace("\\", "/"))
    digest = hashlib.sha256(f"{seed}\x00{name}\x00{photo.product_id}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def product_groups(bundle, catalog: Catalog | None = None) -> tuple[list[str], list[str]]:
    """(group, kind) of every bundle product; a catalogue fills in what the bundle lacks."""
    groups, kinds = [], []
    for p in bundle.products:
        g, k = p.group, p.kind
        if catalog is not None and p.product_id in catalog:
            c = catalog.get(p.product_id)
            g, k = g or c.group, k or c.kind
        groups.append(g)
        kinds.append(k)
    return groups, kinds


def make_pairs(embedded: Embedded, groups: Sequence[str], *, seed: int = DEFAULT_SEED,
               n_impostors: int = N_IMPOSTORS) -> Pairs:
    """Build the protocol's pairs (see the module docstring) and look up their scores."""
    groups_arr = np.asarray(groups, dtype=object)
    n_products = len(groups_arr)
    by_group: dict[str, np.ndarray] = {}
    for g in set(groups):
        by_group[g] = np.nonzero(groups_arr == g)[0]
    all_idx = np.arange(n_products)
    photo_idx, product_idx, kinds = [], [], []
    for n, (photo, p) in enumerate(zip(embedded.photos, embedded.truth)):
        g = groups_arr[p]
        photo_idx.append(n)
        product_idx.append(int(p))
        kinds.append(GENUINE)
        if g:
            hard = by_group[g][by_group[g] != p]
            others = all_idx[groups_arr != g]
        else:
            hard = np.zeros(0, np.int64)
            others = all_idx[all_idx != p]
        rng = _photo_rng(seed, photo)
        chosen = rng.choice(others, size=min(n_impostors, others.size), replace=False) if others.size else []
        for q in sorted(int(x) for x in chosen):
            photo_idx.append(n)
            product_idx.append(q)
            kinds.append(IMPOSTOR)
        for q in hard:
            photo_idx.append(n)
            product_idx.append(int(q))
            kinds.append(HARD)
    photo_a = np.asarray(photo_idx, dtype=np.int64)
    product_a = np.asarray(product_idx, dtype=np.int64)
    table = embedded.scores if embedded.pair_scores is None else embedded.pair_scores
    score = table[photo_a, product_a] if photo_a.size else np.zeros(0, np.float32)
    return Pairs(photo_a, product_a, np.asarray(kinds, dtype=object).astype(str), score)


def impostor_draws(embedded: Embedded, groups: Sequence[str], *, seed: int = DEFAULT_SEED,
                   n_impostors: int = N_IMPOSTORS, draws: int = IMPOSTOR_DRAWS) -> list[Pairs]:
    """The protocol's pairs for ``draws`` draws of the random impostors, seeds ``seed`` ..
    ``seed + draws - 1`` (genuine and hard pairs are the same in each)."""
    return [make_pairs(embedded, groups, seed=seed + k, n_impostors=n_impostors)
            for k in range(max(1, int(draws)))]


def protocol_description(seed: int, n_impostors: int = N_IMPOSTORS) -> dict:
    return {
        "version": PROTOCOL_VERSION, "seed": seed, "random_impostors_per_photo": n_impostors,
        "pairs": "each photo vs its own product (genuine), vs "
                 f"{n_impostors} random products of other groups (impostor), and vs "
                 "every other product of its own group (hard impostor); "
                 "score = cosine to the product's best reference",
        "identification": "rank of the true product among every product of the bundle",
    }
