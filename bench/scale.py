"""Throughput and scale: enrolment rate, identify over 1k..1M enrolled products with
the engine's ``Verifier.rank`` (a bundle's float16 latents with a float32 copy up to
16 MiB, above that an int8 shortlist: ``search.ReferenceSearch``) and with latents stored as float32 / float16 /
int8 in the library's ``search.LatentIndex``, and batch ``score`` with each photo
embedded once."""

from __future__ import annotations

import contextlib
import csv
import io
import math
import time
import tracemalloc
from pathlib import Path

import numpy as np

from auditlens.catalog import Catalog, LabelledPhoto, Product
from auditlens.device_app.search import DTYPES, LatentIndex, ReferenceSearch

from .common import Timing, measure, pixel_size


def enroll_rate(catalog: Catalog, model: Path, out: Path, repeats: int = 1, *,
                as_zip: bool = False) -> dict:
    """Originals enrolled per second by ``export.enroll.enroll`` with its default options
    (decoding threads + a 2-thread interpreter), writing a folder bundle (every file
    fsync'ed) or a ``.zip`` bundle (one file)."""
    from auditlens.export.enroll import EnrollOptions, enroll

    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        enroll(catalog, out / f"bundle_{i}{'.zip' if as_zip else ''}", model=model,
               options=EnrollOptions(progress=False))
        times.append(time.perf_counter() - t0)
    best = float(np.median(times))
    opts = EnrollOptions()
    return {"originals": len(catalog), "pixels": pixel_size(p.image for p in catalog),
            "seconds_median": best, "per_second": len(catalog) / best,
            "runs": repeats, "workers": opts.workers, "interpreter_threads": opts.num_threads,
            "bundle": "zip" if as_zip else "folder"}


def photo_catalog(photos: list[LabelledPhoto], n: int) -> Catalog:
    """A catalogue of ``n`` products whose 'originals' are field photos (for throughput)."""
    return Catalog([Product(f"p{i:06d}", f"p{i:06d}", ph.photo) for i, ph in enumerate(photos[:n])],
                   "field photos as originals")


def _random_unit(rng, n: int, d: int) -> np.ndarray:
    out = np.empty((n, d), dtype=np.float32)
    for start in range(0, n, 100_000):
        block = rng.standard_normal((min(100_000, n - start), d), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[start:start + len(block)] = block
    return out


def _engine(latents: np.ndarray, n: int):
    """What ``Verifier.rank`` searches: the latents as a bundle holds them (float16) in a
    ``ReferenceSearch``; returns (its top-5 function, bytes of latents it holds)."""
    search = ReferenceSearch(latents.astype(np.float16), np.arange(n, dtype=np.int32), n)
    return (lambda q, k=5: search.top_k(q, k)[0]), search.nbytes


GENUINE_COSINE = 0.6
"""Cosine of each identify query to its own product's latent: where the shipped model puts
a real photo of the product (genuine mean 0.62 on grocery-dev's val photos,
models/training_report.json), just above its decision threshold (0.57,
models/encoder.json). The runners-up (random latents) sit a few thousandths apart, so
the top-5 overlap shows where float16 / int8 rounding changes the answer."""

ENGINE = "float16 + float32 / int8, engine (Verifier.rank)"
"""The storage ``Verifier.identify`` (and so the CLI and the app) searches."""
LIBRARY = "search.LatentIndex (library)"


def noise_for_cosine(cosine: float, dim: int) -> float:
    """Standard deviation of Gaussian noise that, added to a unit latent of ``dim``
    dimensions, leaves the result at ``cosine`` to it: the noise has a norm of about
    ``sigma * sqrt(dim)`` and is nearly orthogonal to the latent, so the cosine is
    ``1 / sqrt(1 + sigma**2 * dim)``."""
    return math.sqrt((1.0 / cosine**2 - 1.0) / dim)


def noisy_queries(latents: np.ndarray, picks: np.ndarray, rng, cosine: float = GENUINE_COSINE) -> np.ndarray:
    """Unit queries at about ``cosine`` to the latents ``picks`` (:func:`noise_for_cosine`)."""
    dim = latents.shape[1]
    noise = noise_for_cosine(cosine, dim) * rng.standard_normal((len(picks), dim), dtype=np.float32)
    queries = latents[picks] + noise
    return queries / np.linalg.norm(queries, axis=1, keepdims=True)


def _top5_exact(latents: np.ndarray, q: np.ndarray) -> list[int]:
    scores = latents @ q
    top = np.argpartition(-scores, 4)[:5]
    return [int(i) for i in top[np.argsort(-scores[top])]]


def identify_scale(sizes: list[int], dim: int, runs: int, seed: int = 0, n_queries: int = 32,
                   log=print) -> list[dict]:
    """Latency, memory and agreement with the exact float32 scan (same best product; share
    of its top 5 found) for each catalogue size and storage type. Latents are random unit
    vectors; each query is a stored latent plus noise, at :data:`GENUINE_COSINE` to it."""
    rng = np.random.default_rng(seed)
    rows = []
    for n in sizes:
        latents = _random_unit(rng, n, dim)
        picks = rng.integers(0, n, n_queries)
        queries = noisy_queries(latents, picks, rng)
        exact = [_top5_exact(latents, q) for q in queries]
        cosine = float(np.mean(np.sum(queries * latents[picks], axis=1)))
        n_runs = runs if n < 1_000_000 else max(5, runs // 5)
        variants: list[tuple[str, object, int]] = []
        variants.append((ENGINE, *_engine(latents, n)))
        for dtype in DTYPES:
            index = LatentIndex(latents, dtype=dtype)
            variants.append((f"{dtype}, {LIBRARY}", lambda q, index=index: index.top_k(q, 5)[0], index.nbytes))
        for label, fn, nbytes in variants:
            def one(fn=fn, queries=queries, state={"i": 0}):  # noqa: B006 - a per-loop counter
                fn(queries[state["i"] % len(queries)])
                state["i"] += 1

            t = measure(one, n_runs, warmup=2)
            tracemalloc.start()
            fn(queries[0])
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            found = [[int(i) for i in np.asarray(fn(q))[:5]] for q in queries]
            agree = float(np.mean([f[0] == e[0] for f, e in zip(found, exact)]))
            overlap = float(np.mean([len(set(f) & set(e)) / 5 for f, e in zip(found, exact)]))
            rows.append({"products": n, "storage": label, "latents_bytes": int(nbytes),
                         "query_scratch_bytes": int(peak), "top1_agreement": agree, "top5_overlap": overlap,
                         "queries": len(queries), "query_cosine_mean": cosine, **t.to_dict()})
            log(f"  identify {n:>9,d}  {label:44s} {t.cell(3)} ms  latents {nbytes / 2**20:8.1f} MiB  "
                f"scratch {peak / 2**20:6.1f} MiB  top-1 agree {agree:.0%}, top-5 overlap {overlap:.0%}")
        del latents, variants
    return rows


def identify_end_to_end(bundle_path: Path, photo: str, runs: int) -> Timing:
    """``Verifier.identify`` of a grocery photo against the benchmark bundle."""
    from auditlens.device_app.verifier import Verifier

    verifier = Verifier(bundle_path)
    return measure(lambda: verifier.identify(photo, 5), runs, warmup=2)


def score_pairs(bundle_path: Path, photos: list[LabelledPhoto], product_ids: list[str],
                n_pairs: int, workdir: Path) -> dict:
    """``auditlens score`` over ``n_pairs`` (photo, product) pairs, each photo embedded once."""
    from auditlens.cli import main

    pairs = []
    per_photo = max(1, min(len(product_ids), -(-n_pairs // max(len(photos), 1))))
    for i, ph in enumerate(photos):
        claimed = [ph.product_id] + [p for p in product_ids if p != ph.product_id]
        offset = i % max(1, len(claimed) - 1)
        chosen = [claimed[0]] + (claimed[1:][offset:] + claimed[1:][:offset])[: per_photo - 1]
        pairs += [(ph.photo, pid) for pid in chosen]
        if len(pairs) >= n_pairs:
            break
    pairs = pairs[:n_pairs]
    pairs_csv = workdir / "score_pairs.csv"
    with pairs_csv.open("w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["photo", "product_id"])
        w.writerows(pairs)
    out = workdir / "scored.csv"
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        rc = main(["score", "--pairs", str(pairs_csv), "--out", str(out), "--bundle", str(bundle_path),
                   "--no-progress"])
    seconds = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"auditlens score exited with status {rc}: no throughput to report")
    with out.open(newline="") as fh:
        errors = sum(1 for row in csv.DictReader(fh) if row["error"])
    if errors:  # a pair that failed costs no inference: it would flatter the rate
        raise RuntimeError(f"auditlens score failed on {errors} of {len(pairs)} pairs; see {out}")
    n_photos = len({p for p, _ in pairs})
    return {"pairs": len(pairs), "photos": n_photos, "pairs_per_photo": len(pairs) / n_photos,
            "seconds": seconds, "photos_per_second": n_photos / seconds,
            "pairs_per_second": len(pairs) / seconds, "exit_status": rc}
