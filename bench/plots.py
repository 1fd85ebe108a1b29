"""PNG plots of a benchmark run (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def roc(methods, out: Path, labels: dict[str, str] | None = None) -> Path:
    """TAR against FAR (log) of every method on the protocol's pairs; ``labels`` renames
    methods in the legend (auditlens: whether it was trained on these products)."""
    labels = labels or {}
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    lowest = 1e-3  # the smallest FAR the impostor pairs resolve (one of them), at most 1e-3
    for m in methods:
        g, i = np.asarray(m.genuine, float), np.asarray(m.impostor, float)
        ts = np.unique(np.concatenate([g, i]))[::-1]
        far = np.array([(i >= t).mean() for t in ts])
        tar = np.array([(g >= t).mean() for t in ts])
        lowest = max(lowest, 1 / max(len(i), 1))
        seen = far > 0  # FAR 0 has no place on a log axis, and says nothing below 1 / pairs
        ax.plot(far[seen], tar[seen], label=f"{labels.get(m.name, m.name)} (EER {m.eer:.1%})",
                lw=2.5 if m.name == "auditlens" else 1.2)
    ax.axvline(0.01, color="grey", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_xlim(lowest, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false-accept rate (FAR)")
    ax.set_ylabel("true-accept rate (TAR)")
    ax.set_title("Verification ROC, same pairs for every method")
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def speed_accuracy(methods, out: Path, photo_size: str, labels: dict[str, str] | None = None) -> Path:
    """Time per verification (log) of a ``photo_size`` photo against EER (``labels``: as
    for :func:`roc`)."""
    labels = labels or {}
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for m in methods:
        ax.scatter(m.verify.median, m.eer * 100, s=60 if m.name == "auditlens" else 30)
        ax.annotate(labels.get(m.name, m.name), (m.verify.median, m.eer * 100), textcoords="offset points",
                    xytext=(5, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel(f"time per verification of a {photo_size} photo, median (ms, log)")
    ax.set_ylabel("EER (%)")
    ax.set_title("Speed and accuracy (lower left is better)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def latency(rows, out: Path) -> Path:
    """Median (dot, with its value) and p95 (end of the line) of each latency row, on a log
    axis (dots, not bars: a bar's length on a log axis means nothing)."""
    import textwrap

    plt = _pyplot()
    labels = [textwrap.fill(r.what, 58) for r in rows]
    med = np.array([r.timing.median for r in rows])
    p95 = np.array([r.timing.p95 for r in rows])
    lines = sum(label.count("\n") + 1 for label in labels)
    fig, ax = plt.subplots(figsize=(10, 0.26 * lines + 0.12 * len(rows) + 1.3))
    y = np.arange(len(rows))
    ax.hlines(y, med, np.maximum(p95, med), color="tab:blue", lw=1.2)
    ax.plot(med, y, "o", color="tab:blue", ms=4)
    ax.plot(p95, y, "|", color="tab:blue", ms=7)
    for yy, m, p in zip(y, med, np.maximum(p95, med)):
        ax.annotate(f"{m:.2f}", (p, yy), textcoords="offset points", xytext=(6, -3), fontsize=7)
    ax.set_yticks(y, labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlim(right=ax.get_xlim()[1] * 3)  # room for the values
    ax.set_xlabel("ms, log (dot and number: median; line to p95)")
    ax.set_title("auditlens latency")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def identify_scale(rows, out: Path) -> Path:
    """Identify latency and latent memory against catalogue size, per storage type."""
    plt = _pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for storage in dict.fromkeys(r["storage"] for r in rows):
        sel = [r for r in rows if r["storage"] == storage]
        n = [r["products"] for r in sel]
        a1.plot(n, [r["median_ms"] for r in sel], marker="o", label=storage)
        a2.plot(n, [r["latents_bytes"] / 1e6 for r in sel], marker="o", label=storage)
    for ax, ylabel in ((a1, "identify, median ms"), (a2, "latents, MB")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("enrolled products")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    a1.axhline(20, color="grey", ls=":", lw=1, label="goal: <= 20 ms at 100k (engine)")
    a2.axhline(50, color="grey", ls=":", lw=1, label="goal: <= 50 MB at 100k (engine)")
    for ax in (a1, a2):
        ax.legend(fontsize=7, loc="best")
    fig.suptitle("identify over large catalogues (random unit latents)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
