"""Run one load scenario in a fresh process and print its figures as JSON.

    python load_driver.py catalog N WORKDIR MODEL           # the bundle `score` runs against
    python load_driver.py score  N WORKDIR MODEL [UNIQUE]   # `auditlens score` over N pairs
    python load_driver.py enroll N WORKDIR MODEL            # `auditlens enroll` of N originals

Generates the images (small JPEGs: the point is the count, not the size), then runs the
CLI's ``main`` in this process with a low open-files limit, and reports peak RSS
(``getrusage``), RSS after the imports, open file descriptors before and after, and time.
"""

from __future__ import annotations

import csv
import json
import os
import resource
import sys
import time
from pathlib import Path

FD_LIMIT = 256
"""A leak of one descriptor per photo or original would hit this long before 10,000."""


def _rss_mib() -> float:
    """Peak RSS of this program. VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec(),
    so a child of a big pytest process would report the parent's peak."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _current_rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _images(folder: Path, n: int, size=(160, 120)) -> list[Path]:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    paths = []
    for i in range(n):
        path = folder / f"p{i:05d}.jpg"
        if not path.exists():
            tile = np.roll(base, i, axis=(0, 1)) ^ np.uint8(i % 251)
            img = Image.fromarray(tile).resize(size, Image.Resampling.NEAREST)
            img.save(path, quality=85)
        paths.append(path)
    return paths


def main() -> int:
    scenario, n, workdir, model = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
    unique = int(sys.argv[5]) if len(sys.argv) > 5 else n
    workdir.mkdir(parents=True, exist_ok=True)
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

    import auditlens.device_app.verifier  # noqa: F401  and the engine, LiteRT included
    from auditlens.cli import main as cli  # imports numpy, Pillow, the CLI

    if scenario == "score":
        photos = _images(workdir / "photos", unique)
        bundle = workdir / "bundle"  # made beforehand by the "catalog" scenario
        ids = sorted(p.stem for p in (workdir / "catalog").glob("*.jpg"))
        pairs = workdir / "pairs.csv"
        with pairs.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["photo", "product_id"])
            for i in range(n):
                w.writerow([str(photos[i % unique]), ids[(i * 7) % len(ids)]])
        argv = ["score", "--bundle", str(bundle), "--pairs", str(pairs), "--out", str(workdir / "scores.csv"),
                "--no-progress"]
    elif scenario == "catalog":  # the bundle `score` runs against: n products
        _images(workdir / "catalog", n, size=(200, 150))
        return cli(["enroll", str(workdir / "catalog"), "--model", model, "--out", str(workdir / "bundle"),
                    "--no-progress"])
    elif scenario == "enroll":
        _images(workdir / "originals", n)
        argv = ["enroll", str(workdir / "originals"), "--model", model, "--out", str(workdir / "bundle.zip"),
                "--no-progress"]
    else:
        raise SystemExit(f"unknown scenario {scenario}")

    import gc

    gc.collect()
    rss_before, fds_before = _current_rss_mib(), _fds()
    started = time.perf_counter()
    rc = cli(argv)
    elapsed = time.perf_counter() - started
    gc.collect()
    result = {
        "scenario": scenario, "n": n, "unique_images": unique, "rc": rc,
        "seconds": round(elapsed, 1), "rss_after_imports_mib": round(rss_before, 1),
        "peak_rss_mib": round(_rss_mib(), 1), "fds_before": fds_before, "fds_after": _fds(),
        "fd_limit": FD_LIMIT,
    }
    if scenario == "score":
        with open(workdir / "scores.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        result["rows"] = len(rows)
        result["errors"] = sum(r["verdict"] == "error" for r in rows)
    print("RESULT " + json.dumps(result), flush=True)
    return 0



if __name__ == "__main__":
    sys.exit(main())
