"""device_app/search.py: compact latents rank products like the exact float32 scan."""

from __future__ import annotations

import numpy as np
import pytest

from auditlens.device_app.search import (
    DTYPES,
    FLOAT32_COPY_BYTES,
    LatentIndex,
    ReferenceSearch,
    best_reference_scores,
    cosines,
)
from bench.scale import GENUINE_COSINE, noisy_queries


def _unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _exact_products(latents, owners, q):
    sims = latents @ (q / np.linalg.norm(q))
    best = np.full(owners.max() + 1, -np.inf, dtype=np.float32)
    np.maximum.at(best, owners, sims)
    return best


@pytest.mark.parametrize("dtype", DTYPES)
def test_top_k_matches_exact_scan(dtype):
    rng = np.random.default_rng(1)
    latents = _unit(rng, 5000, 128)
    index = LatentIndex(latents, dtype=dtype)
    for i in (3, 777, 4999):
        q = latents[i] + 0.05 * rng.standard_normal(128).astype(np.float32)
        ids, scores = index.top_k(q, 5)
        exact = latents @ (q / np.linalg.norm(q))
        assert ids[0] == i == int(np.argmax(exact))
        assert np.all(np.diff(scores) <= 1e-7)  # best first
        np.testing.assert_allclose(scores, exact[ids], atol=1e-2 if dtype != "float32" else 1e-5)
        approx = index.product_scores(q)
        np.testing.assert_allclose(approx, exact, atol=0.03)


@pytest.mark.parametrize("dtype", DTYPES)
def test_several_references_per_product(dtype):
    rng = np.random.default_rng(2)
    latents = _unit(rng, 900, 64)
    owners = rng.integers(0, 300, 900)
    owners[:300] = np.arange(300)  # every product has a row
    index = LatentIndex(latents, owners, dtype=dtype)
    assert index.num_products == 300
    q = latents[450]
    exact = _exact_products(latents, owners, q)
    np.testing.assert_allclose(index.product_scores(q), exact, atol=0.03)
    ids, scores = index.top_k(q, 10)
    assert len(set(ids.tolist())) == 10  # distinct products
    assert ids[0] == owners[450]
    assert set(ids.tolist()) <= set(np.argsort(-exact)[:15].tolist())


def test_int8_is_compact_and_never_overflows():
    rng = np.random.default_rng(3)
    d = 256
    latents = np.zeros((4, d), dtype=np.float32)
    latents[0, 0] = 1.0  # all weight in one component: the extreme dot product
    latents[1] = 1.0  # spread evenly
    latents[2] = -latents[1]
    latents[3] = _unit(rng, 1, d)
    index = LatentIndex(latents, dtype="int8")
    assert index.nbytes == 4 * d
    for q in latents:
        scores = index.product_scores(q)
        np.testing.assert_allclose(scores, (latents / np.linalg.norm(latents, axis=1, keepdims=True))
                                   @ (q / np.linalg.norm(q)), atol=0.03)
        assert scores.max() > 0.97  # the row itself, not a wrapped-around negative


def test_k_larger_than_catalogue_and_bad_input():
    latents = _unit(np.random.default_rng(4), 3, 8)
    index = LatentIndex(latents, dtype="float16")
    ids, scores = index.top_k(latents[1], 10)
    assert sorted(ids.tolist()) == [0, 1, 2] and ids[0] == 1
    assert index.top_k(latents[1], 0)[0].size == 0
    with pytest.raises(ValueError):
        index.top_k(np.ones(9, dtype=np.float32))
    with pytest.raises(ValueError):
        LatentIndex(latents, dtype="int4")
    with pytest.raises(ValueError):
        LatentIndex(latents, owners=np.array([0, 2, 2]))  # product 1 has no row


def test_from_bundle_like_object():
    class _Bundle:
        references = _unit(np.random.default_rng(5), 6, 16)
        reference_owner = np.array([0, 0, 1, 2, 2, 2], dtype=np.int32)

    index = LatentIndex.from_bundle(_Bundle(), dtype="float32")
    ids, _ = index.top_k(_Bundle.references[4], 3)
    assert ids[0] == 2 and sorted(ids.tolist()) == [0, 1, 2]


def test_int8_scan_in_blocks_equals_one_pass(monkeypatch):
    import auditlens.device_app.search as search

    latents = _unit(np.random.default_rng(6), 2500, 32)
    q = latents[1234]
    whole = LatentIndex(latents, dtype="int8").product_scores(q)
    monkeypatch.setattr(search, "_INT8_BLOCK", 1000)  # 3 blocks, the last one short
    index = LatentIndex(latents, dtype="int8")
    np.testing.assert_array_equal(index.product_scores(q), whole)
    assert index.top_k(q, 1)[0][0] == 1234


def _catalogue(rng, products, extra, dim=128):
    """float16 unit latents as a bundle holds them: one row per product, ``extra`` more
    rows for random products, rows shuffled."""
    owner = np.r_[np.arange(products), rng.integers(0, products, extra)]
    rng.shuffle(owner)
    return _unit(rng, len(owner), dim).astype(np.float16), owner


def _genuine_query(rng, row, cosine=GENUINE_COSINE):
    """A unit query at about ``cosine`` to ``row``, where a real photo sits to its original."""
    return noisy_queries(row[None].astype(np.float32), np.array([0]), rng, cosine)[0]


def test_reference_search_shortlist_finds_the_full_scans_top_k():
    """A large catalogue (int8 shortlist) gets the top 5 of the exact scan of every row,
    with its exact scores (the best row of each product, computed here by hand)."""
    rng = np.random.default_rng(2)
    refs, owner = _catalogue(rng, 6000, 3000)
    search = ReferenceSearch(refs, owner, 6000, float32_copy_bytes=0)
    assert search.index is not None
    for _ in range(40):
        q = _genuine_query(rng, refs[rng.integers(len(refs))])
        by_hand = _exact_products(refs.astype(np.float32), owner, q)
        want = np.lexsort((np.arange(6000), -by_hand))[:5]
        ids, scores = search.top_k(q, 5)
        np.testing.assert_array_equal(ids, want)
        np.testing.assert_allclose(scores, by_hand[want], rtol=1e-6)


def test_reference_search_shortlist_grows_among_look_alikes():
    """300 near-identical products (cosine about 0.99 to each other, int8 rounding larger
    than their differences) and a query close to one of them: the shortlist of 64 by the
    int8 scan would miss members of the exact top 5; growing it finds all of them."""
    rng = np.random.default_rng(6)
    refs, owner = _catalogue(rng, 5000, 0)
    centre = _unit(rng, 1, 128)[0]
    family = centre + 0.012 * rng.standard_normal((300, 128)).astype(np.float32)
    refs[:300] = (family / np.linalg.norm(family, axis=1, keepdims=True)).astype(np.float16)
    search = ReferenceSearch(refs, owner, 5000, float32_copy_bytes=0)
    missed = 0
    for _ in range(30):
        q = _genuine_query(rng, refs[rng.integers(300)], cosine=0.975)
        by_hand = _exact_products(refs.astype(np.float32), owner, q)
        want = np.lexsort((np.arange(5000), -by_hand))[:5]
        missed += len(set(want) - set(search.top_k(q, 5)[0]))
    assert missed == 0


def test_reference_search_small_catalogues_score_every_row():
    rng = np.random.default_rng(3)
    refs, owner = _catalogue(rng, 300, 200)
    search = ReferenceSearch(refs, owner, 300)
    assert search.index is None and search.nbytes == refs.nbytes * 3  # float16 + float32 copy
    q = _genuine_query(rng, refs[0])
    ids, scores = search.top_k(q, 1000)  # more than there are products: every product, best first
    assert sorted(ids) == list(range(300)) and np.all(np.diff(scores) <= 0)
    np.testing.assert_array_equal(scores[np.argsort(ids)], search.product_scores(q))
    with pytest.raises(ValueError, match="at least 1"):
        search.top_k(q, 0)


@pytest.mark.parametrize("copy_bytes", [FLOAT32_COPY_BYTES, 0])
def test_reference_search_lists_equal_scores_in_product_order(copy_bytes):
    rng = np.random.default_rng(7)
    refs, owner = _catalogue(rng, 3000, 0, dim=64)
    refs[2000:2100] = refs[2000]  # the products of 100 rows share one latent
    ids, scores = ReferenceSearch(refs, owner, 3000, float32_copy_bytes=copy_bytes).top_k(
        refs[2000].astype(np.float32), 3)
    np.testing.assert_array_equal(ids, np.sort(owner[2000:2100])[:3])
    assert scores[0] == scores[1] == scores[2]


def test_reference_search_keeps_the_references_and_adds_one_byte_a_component():
    rng = np.random.default_rng(4)
    refs, owner = _catalogue(rng, 3000, 0, dim=64)
    search = ReferenceSearch(refs, owner, 3000, float32_copy_bytes=0)
    assert search.references is refs  # the bundle's array, not a copy
    assert search.nbytes == 3000 * 64 * (2 + 1)


def test_cosines_of_float16_rows_are_float32_dot_products_of_the_stored_values():
    rng = np.random.default_rng(5)
    rows = _unit(rng, 40_000, 32).astype(np.float16)  # more than one conversion block
    q = _unit(rng, 3, 32)
    got = cosines(q, rows)
    assert got.dtype == np.float32 and got.shape == (3, 40_000)
    np.testing.assert_allclose(got, q.astype(np.float64) @ rows.astype(np.float64).T, atol=1e-6)


def test_a_latent_against_its_own_float16_row_scores_no_more_than_one():
    """Rounded to float16 (as a bundle stores references), a unit latent's own row gives a
    dot product a little above 1 for some latents; a score is a cosine, so it stays <= 1."""
    rng = np.random.default_rng(3)
    latents = rng.normal(size=(200, 128)).astype(np.float32)
    latents /= np.linalg.norm(latents, axis=1, keepdims=True)
    rows = latents.astype(np.float16)
    raw = np.einsum("nd,nd->n", latents, rows.astype(np.float32))
    assert raw.max() > 1.0  # what the clip is for
    assert cosines(latents, rows).max() <= 1.0
    owner = np.arange(200)
    assert best_reference_scores(latents, rows, owner, 200).max() <= 1.0
    search = ReferenceSearch(rows, owner, 200)
    top = int(raw.argmax())
    assert search.best_of_rows(latents[top], [top]) == 1.0
    assert search.top_k(latents[top], 1)[1][0] <= 1.0 and search.product_scores(latents[top]).max() <= 1.0
