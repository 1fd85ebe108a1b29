"""device_app/search.py: compact latents rank products like the exact float32 scan."""

from __future__ import annotations

import numpy as np
import pytest

from auditlens.device_app.search import DTYPES, LatentIndex


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
