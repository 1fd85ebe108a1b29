"""`python -m bench --quick` runs end to end and writes its tables and plots.

A smoke test only: it never asserts a time or an accuracy, just that every section ran
and every method has its row.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MODEL = REPO / "models" / "encoder.tflite"
METHODS = ("pHash", "dHash", "HSV histogram", "SSIM", "ORB + RANSAC", "SIFT + RANSAC", "auditlens")
PLOTS = ("roc.png", "speed_accuracy.png", "latency.png", "identify_scale.png")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    for module in ("cv2", "skimage", "imagehash", "matplotlib"):
        pytest.importorskip(module, reason="the bench extra (auditlens[bench]) is not installed")
    if not MODEL.is_file():
        pytest.skip("no shipped model at models/encoder.tflite")
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_quick_run_writes_tables_and_plots(quick_run):
    out, stdout = quick_run
    md = (out / "results.md").read_text(encoding="utf-8")
    for plot in PLOTS:
        assert (out / plot).stat().st_size > 1000, plot
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({plot})" in md
    for heading in ("## Accuracy, speed and memory", "## Latency", "## Throughput and scale",
                    "## Memory", "## Issue goals"):
        assert heading in md
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    for method in METHODS:
        assert any(line.startswith(f"| {method} |") for line in rows), method
    assert "| encoder int8, 1 thread |" in md
    assert "results.md" in stdout


def test_quick_run_json_has_every_method_and_section(quick_run):
    out, _ = quick_run
    report = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert report["mode"] == "quick"
    assert [a["method"] for a in report["accuracy"]] == list(METHODS)
    for a in report["accuracy"]:
        for key in ("eer", "tar_at_far_1pct", "top1"):
            assert 0.0 <= a[key] <= 1.0
        assert a["verify"]["runs"] > 0 and a["verify"]["median_ms"] > 0
    assert {r["storage"].split(",")[0] for r in report["scale"]["identify"]} >= {"float32", "float16", "int8"}
    assert report["scale"]["score"]["exit_status"] == 0
    assert report["memory"]["rows"][0]["peak_rss_mib"] > 0
    assert set(report["plots"]) == set(PLOTS)
