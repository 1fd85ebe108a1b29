"""Load: `auditlens score` over many pairs and `auditlens enroll` of many originals run in
bounded memory without leaking file descriptors.

Each scenario runs in a fresh process (``load_driver.py``) with an open-files limit of 256
and reports its peak RSS (``getrusage``) and open descriptors before and after. CI runs
reduced counts; ``AUDITLENS_ROBUST_FULL=1`` runs the 10,000 of the report (docs/robustness.md),
and ``pytest -s`` prints the figures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

FULL = os.environ.get("AUDITLENS_ROBUST_FULL") == "1"
DRIVER = Path(__file__).with_name("load_driver.py")
SCORE_PAIRS = 10_000 if FULL else 1_000
SCORE_UNIQUE = 1_000 if FULL else 100
ENROLL_ORIGINALS = 10_000 if FULL else 500
BASE_ALLOWANCE_MIB = 120
"""Interpreter, bundle, Python objects of the run: what a run may add whatever its size."""


def _run(*args, timeout=1800) -> dict:
    proc = subprocess.run([sys.executable, str(DRIVER), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(lines[-1][len("RESULT "):])
    print(f"\n{json.dumps(result)}")
    return result


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, model_path) -> Path:
    folder = tmp_path_factory.mktemp("load")
    proc = subprocess.run([sys.executable, str(DRIVER), "catalog", str(200 if FULL else 50), str(folder), str(model_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return folder


def test_score_many_pairs(workdir, model_path):
    r = _run("score", SCORE_PAIRS, workdir, model_path, SCORE_UNIQUE)
    assert r["rc"] == 0 and r["rows"] == SCORE_PAIRS and r["errors"] == 0
    assert r["fds_after"] == r["fds_before"]  # and 256 open files were never exceeded
    grown = r["peak_rss_mib"] - r["rss_after_imports_mib"]
    assert grown < BASE_ALLOWANCE_MIB + SCORE_UNIQUE * 0.2  # 200 KiB per distinct photo, at most


def test_score_memory_does_not_grow_with_distinct_photos(workdir, model_path):
    small = _run("score", 200, workdir, model_path, 200)
    large = _run("score", 1200, workdir, model_path, 1200)
    per_photo_kib = (large["peak_rss_mib"] - small["peak_rss_mib"]) * 1024 / 1000
    print(f"score: {per_photo_kib:.0f} KiB of peak RSS per distinct photo")
    # a released capture keeps its latent, dHashes and, for a bundle that weighs cells, its
    # cells as int8 (2 views x 64 cells x 128: 16 KiB); its pixels (~400 KiB) go
    assert per_photo_kib < 32


def test_enroll_many_originals(tmp_path, model_path):
    r = _run("enroll", ENROLL_ORIGINALS, tmp_path, model_path)
    assert r["rc"] == 0
    assert r["fds_after"] == r["fds_before"]
    grown = r["peak_rss_mib"] - r["rss_after_imports_mib"]
    # the model inputs (128x128x3: 48 KiB each) are kept until embedding, plus a thumbnail
    assert grown < BASE_ALLOWANCE_MIB + ENROLL_ORIGINALS * 64 / 1024
    from auditlens.device_app.bundle import ReferenceBundle

    bundle = ReferenceBundle.load(tmp_path / "bundle.zip")
    assert len(bundle.products) == ENROLL_ORIGINALS
