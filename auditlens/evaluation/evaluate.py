"""``auditlens evaluate``: how well a bundle verifies labelled field photos.

Runs the protocol of :mod:`.protocol` and reports, overall, per product kind
(``ProductRecord.kind``), for hard impostors only and, given the products held out of
training, for seen and unseen products separately:

* ROC AUC, EER (and its threshold), TAR at FAR 1% and 5%, EER over hard pairs only;
* top-1 / top-5 identification against every product of the bundle;
* FAR / FRR at the bundle's own decision threshold.

``out_dir`` receives ``report.json``, ``summary.md`` (the table in Markdown),
``pairs.csv`` (every scored pair), ``roc.png``,
``det.png``, ``scores.png`` (genuine / impostor histograms with the thresholds) and
``confusions.png`` (the worst false accepts: photo, wrongly matched original, true
original). Metric definitions: :mod:`auditlens.evaluation.metrics`.

A bundle that takes a second look near its threshold
(:mod:`auditlens.device_app.second_look`) has each pair scored as ``Verifier.verify``
decides it; the report's ``second_look`` says how often the look was taken, with the first
look's figures beside.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from auditlens.catalog import (
    Catalog,
    LabelledPhoto,
    read_labelled_photos,
    read_product_ids,
    unchecked_verdicts,
)
from auditlens.cli import non_negative_int, open_catalog_said, thread_count
from auditlens.errors import AuditlensError, CatalogError, OutputPathError
from auditlens.evaluation import metrics
from auditlens.evaluation.protocol import (
    COPY_SCORE,
    DEFAULT_SEED,
    GENUINE,
    HARD,
    N_IMPOSTORS,
    Embedded,
    Pairs,
    contradictory_note,
    embed_photos,
    impostor_draws,
    not_enrolled_note,
    product_groups,
    protocol_description,
    unreadable_note,
)
from auditlens.files import atomic_write, check_output_dir, is_json_object_with

FARS = (0.01, 0.05)
"""False-accept rates TAR is reported at."""

GOALS = {
    # auditlens' quality goals, block: {metric: (comparison, value)}
    "seen": {"eer": ("<=", 0.04), "tar_at_far_1%": (">=", 0.75), "top1": (">=", 0.80)},
    "unseen": {"eer": ("<=", 0.10), "tar_at_far_1%": (">=", 0.40), "top1": (">=", 0.50)},
    "Packages": {"eer": ("<=", 0.03), "top1": (">=", 0.92)},
    "hard impostors": {"eer": ("<=", 0.06)},
}


# -- helpers ------------------------------------------------------------------------
def _verifier(bundle, threads: int = 1):
    from auditlens.device_app.bundle import ReferenceBundle
    from auditlens.device_app.verifier import Verifier, VerifierOptions

    if isinstance(bundle, Verifier):
        return bundle
    if not isinstance(bundle, ReferenceBundle):
        bundle = ReferenceBundle.load(bundle)
    return Verifier(bundle, VerifierOptions(num_threads=threads, check_quality=False))


def _f(x) -> float | None:
    """A rate or score for the report, to 6 decimals; None for a missing or non-finite one
    (JSON has no Infinity)."""
    return None if x is None or not math.isfinite(float(x)) else round(float(x), 6)


def _t(x) -> float | None:
    """A threshold for the report, exactly: rounding 0.56781334 to 0.567813 would accept
    the impostor it was chosen to keep out."""
    return None if x is None or not math.isfinite(float(x)) else float(x)


def summarize(pairs: Pairs, ranks: np.ndarray, photo_mask: np.ndarray,
              threshold: float | None = None, n_products: int | None = None) -> dict:
    """Every metric over the pairs of the photos in ``photo_mask``.

    ``ranks`` are the identification ranks of all photos. Metrics that need a set that
    is empty here (e.g. no hard impostors) are ``None``; so are top-k with ``n_products``
    at most k (every photo would be in the top k), and TAR at a FAR the impostor pairs
    cannot resolve (fewer than 1/FAR of them: it would be the TAR at FAR 0).
    """
    sub = pairs.subset(photo_mask[pairs.photo])
    g = sub.score[sub.genuine]
    imp = sub.score[sub.impostor]
    hard = sub.score[sub.kind == HARD]
    counts = sub.counts()
    out: dict = {"photos": int(photo_mask.sum()), "pairs": counts}
    r = ranks[photo_mask]
    for k in (1, 5):
        trivial = n_products is not None and n_products <= k
        out[f"top{k}"] = _f((r <= k).mean()) if r.size and not trivial else None
    if g.size and imp.size:
        e = metrics.eer(g, imp)
        out["auc"] = _f(metrics.roc_auc(g, imp))
        out["eer"] = _f(e.eer)
        out["eer_threshold"] = _t(e.threshold)
        for far in FARS:
            tar, measured, t = metrics.tar_at_far(g, imp, far)
            resolved = far * imp.size >= 1
            out[f"tar_at_far_{far:.0%}"] = _f(tar) if resolved else None
            out[f"threshold_at_far_{far:.0%}"] = _t(t) if resolved else None
    else:
        out.update({"auc": None, "eer": None, "eer_threshold": None})
        for far in FARS:
            out[f"tar_at_far_{far:.0%}"] = None
            out[f"threshold_at_far_{far:.0%}"] = None
    if g.size and hard.size:
        out["eer_hard"] = _f(metrics.eer(g, hard).eer)
        out["auc_hard"] = _f(metrics.roc_auc(g, hard))
    else:
        out["eer_hard"] = out["auc_hard"] = None
    if threshold is not None and g.size and imp.size:
        far, frr = metrics.far_frr_at(g, imp, threshold)
        out["at_bundle_threshold"] = {
            "threshold": _t(threshold), "far": _f(far), "frr": _f(frr),
            "far_hard": _f((hard >= threshold).mean()) if hard.size else None,
        }
    return out


def _block(pairs: Pairs, ranks: np.ndarray, photo_mask: np.ndarray, kinds_of_photo: np.ndarray,
           threshold: float | None, n_products: int | None = None) -> dict:
    """Overall, hard-impostor-only and per-kind metrics for the photos in ``photo_mask``."""
    block = {"all": summarize(pairs, ranks, photo_mask, threshold, n_products)}
    hard_pairs = pairs.subset(pairs.kind != "impostor")  # genuine + hard
    block["hard impostors"] = summarize(hard_pairs, ranks, photo_mask, threshold)
    # identification does not depend on the pairs: it is reported once, under "all"
    block["hard impostors"]["top1"] = block["hard impostors"]["top5"] = None
    block["by_kind"] = {}
    for kind in sorted(set(kinds_of_photo[photo_mask].tolist())):
        block["by_kind"][kind] = summarize(pairs, ranks, photo_mask & (kinds_of_photo == kind), threshold,
                                           n_products)
    return block


def draw_spread(draws: Sequence[Pairs], masks: dict[str, np.ndarray], seed: int) -> dict:
    """EER, TAR at FAR 1% and AUC over the draws of the random impostors
    (:func:`~.protocol.impostor_draws` from ``seed``; the report's figures are the first),
    for each photo set in ``masks``: min, median and max. With a few hundred photos, a 1%
    false-accept rate rests on about ten impostor scores, so one draw's TAR moves by
    several points."""
    values: dict[str, dict[str, list[float]]] = {name: {"eer": [], "tar_at_far_1%": [], "auc": []}
                                                 for name in masks}
    for pairs in draws:
        for name, mask in masks.items():
            sub = pairs.subset(mask[pairs.photo])
            g, imp = sub.score[sub.genuine], sub.score[sub.impostor]
            if g.size and imp.size:
                values[name]["eer"].append(metrics.eer(g, imp).eer)
                if 0.01 * imp.size >= 1:  # as summarize: fewer pairs cannot resolve 1%
                    values[name]["tar_at_far_1%"].append(metrics.tar_at_far(g, imp, 0.01)[0])
                values[name]["auc"].append(metrics.roc_auc(g, imp))
    out: dict = {"draws": len(draws), "seeds": [seed, seed + len(draws) - 1]}
    for name, by_metric in values.items():
        out[name] = {m: {"min": _f(min(v)), "median": _f(np.median(v)), "max": _f(max(v))}
                     for m, v in by_metric.items() if v}
    return out


FEW_PHOTOS = 100
"""Below this many scored photos the report warns that its figures say little."""



def _without_curves(decision: dict) -> dict:
    """The decision as a report quotes it: without its (long) far curves."""
    out = {k: v for k, v in decision.items() if k != "far_curve"}
    if isinstance(out.get("second_look"), dict):
        out["second_look"] = _without_curves(out["second_look"])
    return out


def second_look_report(look, embedded: Embedded, pairs: Pairs, threshold: float) -> dict:
    """How often the second look was taken, and the first look's figures (every metric the
    table has) beside the verdicts'."""
    first = embedded.scores[pairs.photo, pairs.product]
    taken = look.near(first, threshold)
    genuine, impostor = first[pairs.genuine], first[pairs.impostor]
    ranks = metrics.identification_ranks(embedded.scores, embedded.truth)  # the first look's, as the table's
    everyone = np.ones(len(embedded.photos), bool)
    figures = summarize(Pairs(pairs.photo, pairs.product, pairs.kind, first), ranks, everyone,
                        n_products=embedded.scores.shape[1])
    return {
        "photo_shift": look.photo_shift, "band": look.band, "threshold": look.threshold,
        "share_of_genuine_pairs": _f(taken[pairs.genuine].mean()) if genuine.size else None,
        "share_of_impostor_pairs": _f(taken[pairs.impostor].mean()) if impostor.size else None,
        "first_look": {**{k: v for k, v in figures.items() if k not in ("photos", "pairs")},
                       "far_at_threshold": _f((impostor >= threshold).mean()) if impostor.size else None,
                       "tar_at_threshold": _f((genuine >= threshold).mean()) if genuine.size else None},
    }


def _warnings(report: dict, photos: list[LabelledPhoto], embedded, bundle) -> list[str]:
    """What makes these figures optimistic or their labels doubtful, in words."""
    notes = []
    unchecked = unchecked_verdicts(photos)
    if unchecked:
        notes.append(unchecked)
    if embedded.contradictory:
        notes.append(contradictory_note(embedded.contradictory))
    if embedded.not_enrolled:
        notes.append(not_enrolled_note(embedded.not_enrolled, bundle))
    if embedded.failed:
        notes.append(unreadable_note(embedded.failed, " (report.json's unreadable_photos lists the first 50)"))
    calibrated_on = report["decision"].get("photos_source")
    if calibrated_on and report["photos_source"] and Path(report["photos_source"]).name == calibrated_on:
        notes.append(f"the bundle's threshold was calibrated on {calibrated_on} too: if these are the "
                     "same photos, the rates at the threshold are optimistic; evaluate on others")
    if len(bundle.products) < 2:
        notes.append(f"the bundle holds {len(bundle.products)} product: no photo has an impostor, so there "
                     "is no EER, FAR or TAR and the curves are empty; evaluate a bundle of the catalogue")
    scored = len(embedded.photos)
    if scored < FEW_PHOTOS:
        notes.append(f"only {scored} photos: one photo moves these rates by {1 / scored:.0%} or more, "
                     "so goals met or missed on them say little; evaluate on a few hundred")
    cosines = embedded.scores if embedded.cosines is None else embedded.cosines  # not the cell term
    own = cosines[np.arange(len(embedded.truth)), embedded.truth]
    copies = int((own >= COPY_SCORE).sum())
    others = cosines.size - own.size  # each photo's scores against the other products
    others_mean = float((cosines.sum(dtype=np.float64) - own.sum(dtype=np.float64)) / others) if others else 0.0
    if others_mean >= metrics.COLLAPSED_SCORE:
        notes.append(f"photos score {others_mean:.3f} on average against the other products, "
                     "about as high as against their own: the encoder gives every image nearly the same "
                     "latent (a run too short, or one that diverged); these figures measure nothing yet")
    elif copies:
        notes.append(f"{copies} photo(s) score {COPY_SCORE} or more against their own product: "
                     "enrolled as its references (enroll --references)? they inflate TAR and top-1; "
                     "evaluate on photos the bundle was not made from")
    return notes


def _goals(report: dict) -> list[dict]:
    """Issue 3's goals against the measured figures."""
    split = "seen" in report
    rows = []

    def check(name: str, where: str, block: dict | None) -> None:
        if not block:
            return
        for metric, (op, goal) in GOALS[name].items():
            value = block.get(metric)
            ok = None if value is None else (value <= goal if op == "<=" else value >= goal)
            rows.append({"goal": f"{name}: {metric} {op} {goal:g}", "measured": value,
                         "on": where, "met": ok})

    if split:
        check("seen", "seen products", report["seen"]["all"])
        check("unseen", "unseen products", report["unseen"]["all"])
    else:
        if "split" in report and not report["split"].get("photos_seen", 1):
            check("unseen", "all products (every photo shows an unseen product)",
                  report["overall"]["all"])
        else:
            why = ("no --unseen-products given" if "split" not in report else
                   "no photo of an unseen product")
            check("seen", f"all products ({why})", report["overall"]["all"])
    check("Packages", "kind Packages, all products", report["overall"]["by_kind"].get("Packages"))
    check("hard impostors", "genuine + hard pairs, all products", report["overall"]["hard impostors"])
    return rows


# -- the table ------------------------------------------------------------------------
_COLUMNS = [("photos", "photos", "{:d}"), ("genuine", None, "{:d}"), ("impostor", None, "{:d}"),
            ("AUC", "auc", "{:.3f}"), ("EER", "eer", "{:.1%}"), ("TAR@1%", "tar_at_far_1%", "{:.1%}"),
            ("TAR@5%", "tar_at_far_5%", "{:.1%}"), ("EER hard", "eer_hard", "{:.1%}"),
            ("top-1", "top1", "{:.1%}"), ("top-5", "top5", "{:.1%}")]


def _rows(report: dict) -> list[tuple[str, dict]]:
    rows = []
    sections = [("", report["overall"])]
    if "seen" in report:
        sections += [("seen: ", report["seen"]), ("unseen: ", report["unseen"])]
    for prefix, block in sections:
        rows.append((f"{prefix}all", block["all"]))
        for kind, s in block["by_kind"].items():
            rows.append((f"{prefix}{kind or '(no kind)'}", s))
        rows.append((f"{prefix}hard impostors", block["hard impostors"]))
    return rows


def format_table(report: dict, markdown: bool = False) -> str:
    """The report's headline figures as a text (or Markdown) table."""
    header = ["", *[c[0] for c in _COLUMNS]]
    lines = []
    for name, s in _rows(report):
        cells = [name]
        for title, key, fmt in _COLUMNS:
            if title == "genuine":
                value = s["pairs"][GENUINE]
            elif title == "impostor":
                value = s["pairs"]["impostor"] + s["pairs"][HARD]
            else:
                value = s.get(key)
            if value is None and name.endswith("hard impostors") and key in ("top1", "top5"):
                cells.append("n/a")  # identification ranks the whole catalogue, not pairs
            else:
                cells.append("-" if value is None else fmt.format(value))
        lines.append(cells)
    notes = []
    if any("-" in c[1:] for c in lines):
        notes.append("-: too few pairs to measure it (a rate of 1% needs 100 impostor pairs)")
    if any("n/a" in c[1:] for c in lines):
        notes.append("n/a: top-1/top-5 rank each photo against the whole catalogue; a pair set has none")
    note = "\n".join(notes)
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(c) + " |" for c in lines]
        return "\n".join(out + ([f"\n{note}"] if note else []))
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]
    fmt_row = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([fmt_row(header), fmt_row(["-" * w for w in widths]), *map(fmt_row, lines)]
                     + ([note] if note else []))


# -- plots ----------------------------------------------------------------------------
PLOT_FILES = ("roc.png", "det.png", "scores.png", "confusions.png")
"""Every plot `evaluate` may write into its folder."""


EVALUATION_FILES = ("report.json", "summary.md", "pairs.csv", *PLOT_FILES)
"""Every file `evaluate` may write into, or remove from, its folder."""


def check_evaluation_dir(out_dir: str | os.PathLike) -> Path:
    """Refuse, before any photo is embedded, an output folder whose files an evaluation would
    overwrite or remove but did not write: a bundle's folder, or one holding a report.json,
    summary.md, pairs.csv or plot of something else. A folder of an earlier evaluation is
    rewritten; files of other names are never touched."""
    out = check_output_dir(out_dir)
    if (out / "manifest.json").is_file():
        raise OutputPathError(f"{out} is a bundle's folder; write the evaluation to another folder")
    taken = [name for name in EVALUATION_FILES if (out / name).exists()]
    if taken and not is_json_object_with(out / "report.json", {"protocol", "counts", "overall", "model_id"}):
        raise OutputPathError(f"{out} holds {', '.join(taken)}, not written by an evaluation; evaluate would "
                              "overwrite or remove them: choose a new or empty folder")
    return out


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _curves(pairs: Pairs, photo_sets: Iterable[tuple[str, np.ndarray, bool]]):
    for label, photo_mask, hard_only in photo_sets:
        sub = pairs.subset(photo_mask[pairs.photo])
        imp_mask = sub.kind == HARD if hard_only else sub.impostor
        g, imp = sub.score[sub.genuine], sub.score[imp_mask]
        if g.size and imp.size:
            yield label, metrics.operating_points(g, imp), metrics.eer(g, imp).eer


def plot_roc_det(pairs: Pairs, photo_sets, out_dir: Path, title: str) -> list[str]:
    plt = _pyplot()
    curves = list(_curves(pairs, photo_sets))
    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    for label, pts, e in curves:
        far = np.clip(pts.far, 1e-4, 1)
        ax.plot(far, pts.tar, label=f"{label} (EER {e:.1%})")
    ax.axvline(0.01, color="grey", ls=":", lw=1, label="FAR 1%")
    ax.set_xscale("log")
    ax.set_xlim(1e-3, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false-accept rate (log)")
    ax.set_ylabel("true-accept rate")
    ax.set_title(f"ROC: {title}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(out_dir / "roc.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    ticks = np.array([0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 0.9])
    for label, pts, e in curves:
        ax.plot(metrics.probit(pts.far), metrics.probit(pts.frr), label=f"{label} (EER {e:.1%})")
    lim = metrics.probit([0.0005, 0.95])
    ax.plot(lim, lim, color="grey", ls=":", lw=1, label="FAR = FRR (the EER)")
    ax.set_xticks(metrics.probit(ticks), [f"{t:.1%}" for t in ticks], rotation=45, fontsize=8)
    ax.set_yticks(metrics.probit(ticks), [f"{t:.1%}" for t in ticks], fontsize=8)
    ax.set_xlim(*lim)
    ax.set_ylim(*lim)
    ax.set_xlabel("false-accept rate (normal deviate scale)")
    ax.set_ylabel("false-reject rate (normal deviate scale)")
    ax.set_title(f"DET: {title}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(out_dir / "det.png", dpi=120)
    plt.close(fig)
    return ["roc.png", "det.png"]


def plot_scores(pairs: Pairs, thresholds: dict[str, float], out_dir: Path, title: str, *,
                xlabel: str = "score (cosine to the best reference)") -> list[str]:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    marks = [float(t) for t in thresholds.values() if t is not None]
    lo = min([float(pairs.score.min()), *marks])
    hi = max([float(pairs.score.max()), *marks])
    pad = 0.03 * max(hi - lo, 1e-3)
    bins = np.linspace(lo - pad, hi + pad, 61)
    for label, mask, color in (("genuine", pairs.genuine, "tab:green"),
                               ("random impostor", pairs.kind == "impostor", "tab:red"),
                               ("hard impostor", pairs.kind == HARD, "tab:orange")):
        if mask.any():
            ax.hist(pairs.score[mask], bins=bins, density=True, histtype="step", lw=1.6,
                    color=color, label=f"{label} ({int(mask.sum())})")
    styles = ["-", "--", ":", "-."]
    for (label, t), ls in zip(thresholds.items(), styles):
        if t is not None:
            ax.axvline(t, color="black", ls=ls, lw=1, label=f"{label} {t:.3f}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.set_title(f"Scores: {title}")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(out_dir / "scores.png", dpi=120)
    plt.close(fig)
    return ["scores.png"]


def worst_false_accepts(embedded: Embedded, pairs: Pairs, n: int, threshold: float | None = None) -> list[dict]:
    """The highest-scoring impostor pair of each photo, worst ``n`` photos first; each says
    whether ``threshold`` accepts it (a good model's worst impostors are still rejected)."""
    if n <= 0:
        return []
    imp = np.nonzero(pairs.impostor)[0]
    order = imp[np.argsort(-pairs.score[imp], kind="stable")]
    seen: set[int] = set()
    out: list[dict] = []
    for k in order:
        photo = int(pairs.photo[k])
        if photo in seen:
            continue
        seen.add(photo)
        out.append({"photo": embedded.photos[photo].photo,
                    "true_product": embedded.photos[photo].product_id,
                    "true_score": _f(embedded.scores[photo, embedded.truth[photo]]),
                    "matched_product_index": int(pairs.product[k]), "score": _f(pairs.score[k]),
                    "pair": str(pairs.kind[k]),
                    "accepted": None if threshold is None else bool(pairs.score[k] >= threshold)})
        if len(out) == n:
            break
    return out


def worst_false_rejects(embedded: Embedded, pairs: Pairs, n: int, threshold: float | None = None) -> list[dict]:
    """The ``n`` lowest-scoring genuine pairs, each saying whether ``threshold`` rejects it."""
    gen = np.nonzero(pairs.genuine)[0]
    order = gen[np.argsort(pairs.score[gen], kind="stable")][:n]
    return [{"photo": embedded.photos[int(pairs.photo[k])].photo,
             "product": embedded.photos[int(pairs.photo[k])].product_id,
             "score": _f(pairs.score[k]),
             "rejected": None if threshold is None else bool(pairs.score[k] < threshold)} for k in order]


def plot_confusions(mistakes: list[dict], bundle, spec, out_dir: Path, title: str,
                    threshold: float | None = None) -> list[str]:
    """A sheet of the highest-scoring impostors (:func:`worst_false_accepts`): the photo,
    the other product's original (bundle thumbnail), and its true original; the ones the
    bundle threshold accepts in red."""
    if not mistakes:
        return []
    from PIL import Image

    from auditlens.device_app.imaging import load_image

    plt = _pyplot()
    per_col = 3
    cols = 2 if len(mistakes) > 4 else 1
    rows = -(-len(mistakes) // cols)
    fig, axes = plt.subplots(rows, cols * per_col, figsize=(2.1 * cols * per_col, 2.35 * rows + 0.5),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    blank = Image.new("RGB", (160, 160), (230, 230, 230))
    for m_i, m in enumerate(mistakes):
        r, c = divmod(m_i, cols)
        try:
            photo = load_image(m["photo"], draft=spec.draft_size)
            photo.thumbnail((160, 160))
        except (AuditlensError, OSError):
            photo = blank
        wrong = bundle.products[m["matched_product_index"]]
        try:
            wrong_img = bundle.thumbnail(wrong.product_id)
        except (KeyError, OSError):
            wrong_img = blank
        try:
            true_img = bundle.thumbnail(m["true_product"])
        except (KeyError, OSError, AuditlensError):
            true_img = blank
        verdict = {True: "ACCEPTED", False: "rejected", None: ""}[m.get("accepted")]
        cells = [(photo, f"photo of\n{m['true_product'][:24]}"),
                 (wrong_img, f"{wrong.product_id[:24]}\n{m['score']:.3f} ({m['pair']}) {verdict}"),
                 (true_img, f"true original\n{m['true_score']:.3f}")]
        for j, (img, caption) in enumerate(cells):
            ax = axes[r, c * per_col + j]
            ax.imshow(np.asarray(img))
            ax.set_title(caption, fontsize=7,
                         color="darkred" if j == 1 and m.get("accepted") is not False else "black")
    at = f"; red: accepted at the bundle threshold {threshold:.3f}" if threshold is not None else ""
    fig.suptitle("The highest-scoring impostor of each photo, worst first (photo | other product's "
                 f"original | true original){at}\n{title}", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, dpi=90)
    plt.close(fig)
    # photos make a large truecolour PNG; a 256-colour palette keeps the sheet small
    buf.seek(0)
    Image.open(buf).convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(
        out_dir / "confusions.png", optimize=True)
    return ["confusions.png"]


def _write_pairs_csv(path: Path, embedded: Embedded, pairs: Pairs, bundle) -> None:
    """Every pair and its score. With a second look, ``score`` is the verdict's score on
    the bundle threshold's scale, and ``first_score`` and ``second_look_score`` (empty
    where none was taken) the scores ``verify`` reports."""
    look = bundle.second_look if embedded.pair_scores is not None else None
    with atomic_write(path, newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["photo", "photo_product", "product", "pair", "score"]
                   + (["first_score", "second_look_score"] if look else []))
        for n, p, k, s in zip(pairs.photo, pairs.product, pairs.kind, pairs.score):
            photo = embedded.photos[int(n)]
            row = [photo.photo, photo.product_id, bundle.products[int(p)].product_id, k, f"{s:.6f}"]
            if look:
                first = embedded.scores[n, p]
                row += [f"{first:.6f}", f"{embedded.second_scores[n, p]:.6f}" if look.near(first, bundle.threshold)
                        else ""]
            w.writerow(row)


def _atomic_json(path: Path, data) -> None:
    with atomic_write(path) as fh:
        json.dump(data, fh, indent=1, ensure_ascii=False)
        fh.write("\n")


# -- the entry point ---------------------------------------------------------------------
def evaluate(
    bundle,
    labelled_photos: Sequence[LabelledPhoto] | str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    *,
    catalog: Catalog | None = None,
    unseen_products: Iterable[str] | None = None,
    seed: int = DEFAULT_SEED,
    n_impostors: int = N_IMPOSTORS,
    threads: int = 1,
    progress: bool = True,
    plots: bool = True,
    worst: int = 12,
    verbose: bool = True,
) -> dict:
    """Evaluate ``bundle`` (a path, a ``ReferenceBundle`` or a ``Verifier``) on labelled
    photos (a list or a ``photo,product_id`` CSV) and return the report.

    Args:
        out_dir: where report.json, pairs.csv and the PNGs go (nothing written if None).
        catalog: fills in ``group``/``kind`` for bundles enrolled without them.
        unseen_products: ids of products held out of training: the report then has
            ``seen`` and ``unseen`` sections besides ``overall``.
        seed: the protocol's seed for the random impostors.
    """
    if out_dir is not None:
        check_evaluation_dir(out_dir)
        if plots:  # a missing matplotlib fails here, before any photo is embedded
            import matplotlib  # noqa: F401
    source = ""
    if isinstance(labelled_photos, (str, os.PathLike)):
        source = str(labelled_photos)
        labelled_photos = read_labelled_photos(labelled_photos)
    photos = list(labelled_photos)
    if not photos:
        raise CatalogError(f"{source or 'labelled photos'}: no photos to evaluate")
    verifier = _verifier(bundle, threads)
    b = verifier.bundle
    look = verifier.second_look
    embedded = embed_photos(verifier, photos, progress=progress, desc="evaluating",
                            second_look_shift=look.photo_shift if look else 0.0)
    if not embedded.photos:
        raise CatalogError(f"{source or 'labelled photos'}: none of the {len(photos)} photos could be "
                           f"scored ({len(embedded.failed)} unreadable, {len(embedded.not_enrolled)} "
                           "of products not in the bundle)")
    if look:  # the pairs score as the verifier decides them
        embedded.pair_scores = look.decision_scores(embedded.scores, embedded.second_scores, b.threshold)
    groups, kinds = product_groups(b, catalog)
    draws = impostor_draws(embedded, groups, seed=seed, n_impostors=n_impostors)
    pairs = draws[0]  # the report's pairs; the other draws give the spread
    ranks = metrics.identification_ranks(embedded.scores, embedded.truth)
    photo_kind = np.array([kinds[t] or "(no kind)" for t in embedded.truth], dtype=object)
    everyone = np.ones(len(embedded.photos), bool)
    threshold = b.threshold

    report: dict = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "bundle": str(b.path),
        "model_id": b.model_id,
        "photos_source": source,
        "decision": _without_curves(b.decision),
        "protocol": protocol_description(seed, n_impostors),
        "counts": {"photos_given": len(photos), "photos_scored": len(embedded.photos),
                   "photos_unreadable": len(embedded.failed),
                   "photos_of_products_not_enrolled": len(embedded.not_enrolled),
                   "photo_rows_repeated": len(embedded.repeated),
                   "photo_rows_contradictory": len(embedded.contradictory),
                   "products": len(b.products), "references": int(len(b.references)),
                   "pairs": pairs.counts()},
        "unreadable_photos": [{"photo": p, "error": e} for p, e in embedded.failed[:50]],
        "overall": _block(pairs, ranks, everyone, photo_kind, threshold, len(b.products)),
    }
    if unseen_products is not None:
        unseen = set(unseen_products)
        enrolled = {p.product_id for p in b.products}
        missing = sorted(unseen - enrolled)
        is_unseen = np.array([b.products[t].product_id in unseen for t in embedded.truth], bool)
        report["split"] = {"unseen_products": sorted(unseen & enrolled),
                           "unseen_not_in_bundle": missing,
                           "photos_seen": int((~is_unseen).sum()), "photos_unseen": int(is_unseen.sum())}
        if missing and verbose:  # a typo, or ids of another catalogue: not silently dropped
            shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
            print(f"warning: {len(missing)} of the {len(unseen)} unseen product ids are not in the "
                  f"bundle and are ignored: {shown}", file=sys.stderr)
        if is_unseen.any() and (~is_unseen).any():
            report["seen"] = _block(pairs, ranks, ~is_unseen, photo_kind, threshold, len(b.products))
            report["unseen"] = _block(pairs, ranks, is_unseen, photo_kind, threshold, len(b.products))
        else:
            report["split"]["note"] = ("no seen/unseen breakdown: "
                                       + ("no photo shows an unseen product" if not is_unseen.any()
                                          else "every photo shows an unseen product"))
            if verbose:
                print(f"note: {report['split']['note']}")
    masks = {"all": everyone}
    if "seen" in report:
        masks.update(seen=~is_unseen, unseen=is_unseen)
    report["impostor_draws"] = draw_spread(draws, masks, seed)
    if look:
        report["second_look"] = second_look_report(look, embedded, pairs, threshold)
    report["goals"] = _goals(report)
    report["warnings"] = _warnings(report, photos, embedded, b)

    fa = worst_false_accepts(embedded, pairs, worst, threshold)
    for m in fa:
        m["matched_product"] = b.products[m["matched_product_index"]].product_id
    report["worst_false_accepts"] = [{k: v for k, v in m.items() if k != "matched_product_index"} for m in fa]
    report["worst_false_rejects"] = worst_false_rejects(embedded, pairs, worst, threshold)
    misidentified = np.nonzero(ranks > 1)[0]
    top_wrong = embedded.scores.copy()
    top_wrong[np.arange(len(top_wrong)), embedded.truth] = -np.inf
    report["misidentified"] = [
        {"photo": embedded.photos[n].photo, "true_product": embedded.photos[n].product_id,
         "rank": int(ranks[n]), "top1": b.products[int(top_wrong[n].argmax())].product_id}
        for n in misidentified[np.argsort(-ranks[misidentified], kind="stable")][:50]
    ]

    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        files = ["report.json", "pairs.csv"]
        _write_pairs_csv(out / "pairs.csv", embedded, pairs, b)
        if plots:
            title = f"{Path(source).name or 'photos'} vs {b.path.name} ({len(embedded.photos)} photos)"
            sets = [("all", everyone, False), ("hard impostors only", everyone, True)]
            for kind in sorted(set(photo_kind.tolist())):
                sets.append((f"kind {kind}", photo_kind == kind, False))
            if "seen" in report:
                is_unseen = np.array([b.products[t].product_id in set(report["split"]["unseen_products"])
                                      for t in embedded.truth], bool)
                sets += [("seen products", ~is_unseen, False), ("unseen products", is_unseen, False)]
            files += plot_roc_det(pairs, sets, out, title)
            overall = report["overall"]["all"]
            files += plot_scores(pairs, {"bundle threshold": threshold,
                                         "EER threshold": overall.get("eer_threshold"),
                                         "FAR 1% threshold": overall.get("threshold_at_far_1%")},
                                 out, title, **({"xlabel": "score (cosine to the best reference; a second "
                                                 "look's moved by the two thresholds' difference)"} if look else {}))
            files += plot_confusions(fa, b, b.spec, out, title, threshold)
        files.append("summary.md")
        report["files"] = files
        for stale in set(PLOT_FILES) - set(files):  # an earlier run's plots would describe other data
            (out / stale).unlink(missing_ok=True)
        with atomic_write(out / "summary.md") as fh:
            fh.write(summary_markdown(report))
        _atomic_json(out / "report.json", report)

    if verbose:
        print(describe(report))
    return report


def _left_out(counts: dict) -> str:
    """", 2 unreadable (skipped), 1 whose product is not in the bundle (skipped)", or nothing."""
    return "".join(f", {counts[key]} {what}" for key, what in (
        ("photos_unreadable", "unreadable (skipped)"),
        ("photos_of_products_not_enrolled", "whose product is not in the bundle (skipped)"),
        ("photo_rows_repeated", "repeated rows (counted once)"),
        ("photo_rows_contradictory", "labelled with two products (left out)")) if counts.get(key))


def summary_markdown(report: dict) -> str:
    """The headline table and the goals, as Markdown (for READMEs)."""
    c = report["counts"]
    lines = [
        f"Model `{report['model_id']}`, bundle of {c['products']} products, "
        f"{c['photos_scored']} photos ({Path(report['photos_source']).name or 'labelled photos'}"
        f"{_left_out(c)}); "
        f"{c['pairs'][GENUINE]} genuine, {c['pairs']['impostor']} random-impostor and "
        f"{c['pairs'][HARD]} hard-impostor pairs (protocol v{report['protocol']['version']}, "
        f"seed {report['protocol']['seed']}).",
        "",
        format_table(report, markdown=True),
    ]
    spread = _spread_lines(report)
    if spread:
        lines += [""] + [f"* {line}" for line in spread]
    second = _second_look_lines(report)
    if second:
        lines += [""] + [f"* {line}" for line in second]
    if report.get("warnings"):
        lines += [""] + [f"* **warning:** {w}" for w in report["warnings"]]
    if report.get("goals"):
        lines += ["", "| goal | measured | on | met |", "|---|---|---|---|"]
        for g in report["goals"]:
            v = "-" if g["measured"] is None else f"{g['measured']:.3f}"
            met = {True: "yes", False: "**no**", None: "-"}[g["met"]]
            lines.append(f"| {g['goal']} | {v} | {g['on']} | {met} |")
    return "\n".join(lines) + "\n"


def _second_look_lines(report: dict) -> list[str]:
    """How often the bundle's second look was taken, and the first look's figures."""
    look = report.get("second_look")
    if not look or None in (look["share_of_genuine_pairs"], look["share_of_impostor_pairs"]):
        return []
    first = look["first_look"]
    return [f"second look (views moved by {look['photo_shift']:g}) at first scores within {look['band']:g} "
            f"of the threshold: {look['share_of_genuine_pairs']:.1%} of genuine, "
            f"{look['share_of_impostor_pairs']:.1%} of impostor pairs",
            f"first look alone: EER {first['eer']:.2%}, "
            + ("" if first.get("eer_hard") is None else f"same-class EER {first['eer_hard']:.2%}, ")
            + "TAR at FAR 1% " + ("-" if first["tar_at_far_1%"] is None else f"{first['tar_at_far_1%']:.2%}")
            + f"; at the threshold FAR {first['far_at_threshold']:.2%}, FRR {1 - first['tar_at_threshold']:.2%}",
            "the table scores each pair as the verdict does: a TAR at FAR 1% swept over these scores "
            "counts the second look only near the bundle's threshold, so for a set whose 1% point "
            "lies elsewhere (a kind) read its rates at the threshold"]


def _spread_lines(report: dict) -> list[str]:
    d = report.get("impostor_draws")
    if not d:
        return []
    lines = []
    for name in ("all", "seen", "unseen"):
        m = d.get(name)
        if not m or "eer" not in m:
            continue
        e, t = m["eer"], m.get("tar_at_far_1%")
        lines.append(
            f"over {d['draws']} impostor draws (seeds {d['seeds'][0]}-{d['seeds'][1]}), "
            f"{'photos' if name == 'all' else name + ' products'}: EER {e['min']:.1%}-{e['max']:.1%} "
            f"(median {e['median']:.1%})"
            + (f", TAR at FAR 1% {t['min']:.1%}-{t['max']:.1%} (median {t['median']:.1%})" if t else ""))
    return lines


def describe(report: dict) -> str:
    c = report["counts"]
    lines = [
        f"bundle {report['bundle']} (model {report['model_id']}, {c['products']} products), "
        f"{c['photos_scored']} photos scored{_left_out(c)}",
        f"pairs: {c['pairs'][GENUINE]} genuine, {c['pairs']['impostor']} random impostor, "
        f"{c['pairs'][HARD]} hard impostor (seed {report['protocol']['seed']})",
        "",
        format_table(report),
    ]
    lines[1:1] = [f"warning: {w}" for w in report.get("warnings", ())]
    spread = _spread_lines(report)
    if spread:
        lines += [""] + spread

    def rates(at: dict) -> str:
        return f"FAR {at['far']:.2%}, FRR {at['frr']:.2%}" + (
            f", FAR on hard impostors {at['far_hard']:.2%}" if at.get("far_hard") is not None else "")

    at = report["overall"]["all"].get("at_bundle_threshold")
    if at:
        lines += ["", f"at the bundle's threshold {at['threshold']:.4f}: {rates(at)}"]
        # a threshold calibrated on trained products admits more impostors of new ones
        for block, label in (("seen", "photos of products seen in training"),
                             ("unseen", "photos of products never seen")):
            sub = report.get(block, {}).get("all", {}).get("at_bundle_threshold")
            if sub:
                lines.append(f"  {label + ':':37s} {rates(sub)}")
    second = _second_look_lines(report)
    if second:
        lines += ["", second[0]] + [f"  {line}" for line in second[1:]]
    if report.get("goals"):
        lines += ["", "quality goals:"]
        for g in report["goals"]:
            mark = {True: "met ", False: "MISS", None: "  - "}[g["met"]]
            v = "-" if g["measured"] is None else f"{g['measured']:.3f}"
            lines.append(f"  [{mark}] {g['goal']:34s} measured {v}  ({g['on']})")
    return "\n".join(lines)


# -- CLI --------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.description = (
        "Evaluate a reference bundle on labelled field photos with auditlens' protocol: each\n"
        "photo against its own product (genuine), 3 random products of other groups (the\n"
        "catalogue's 'group' column: products that look alike) and every other product of\n"
        "its own group (hard impostors). Reports ROC AUC, EER, TAR at FAR 1%/5%, EER on\n"
        "hard pairs, top-1/top-5 identification, per product kind, and writes report.json,\n"
        "summary.md, pairs.csv, roc.png, det.png, scores.png and confusions.png (the worst\n"
        "false accepts beside the originals they were taken for).")
    p.epilog = ("example:\n  auditlens evaluate --bundle bundle/ --photos val.csv --out eval/ "
                "--unseen-products heldout.txt")
    p.add_argument("--bundle", "-b", type=Path, default=None,
                   help="reference bundle folder or .zip (default: the shipped sample bundle)")
    p.add_argument("--photos", required=True, type=Path, metavar="LABELLED.csv",
                   help="CSV of photo,product_id (paths relative to the CSV)")
    p.add_argument("--out", "-o", required=True, type=Path, metavar="DIR", help="folder for the report")
    p.add_argument("--unseen-products", type=Path, default=None, metavar="FILE",
                   help="ids of products held out of training (one per line, or a JSON list, or "
                        "a training report.json with held_out_products): report seen and unseen apart")
    p.add_argument("--catalog", default=None,
                   help="catalogue to take group/kind from when the bundle lacks them")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="protocol seed (default: %(default)s)")
    p.add_argument("--impostors", type=non_negative_int, default=N_IMPOSTORS,
                   help="random impostors from other groups per photo (default: %(default)s)")
    p.add_argument("--worst", type=non_negative_int, default=12, help="mistakes on the confusion sheet (default: %(default)s)")
    p.add_argument("--threads", type=thread_count, default=min(2, os.cpu_count() or 1),
                   help="interpreter threads (default: %(default)s)")
    p.add_argument("--no-plots", action="store_true", help="write report.json, summary.md and pairs.csv, no PNGs")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args) -> int:
    from auditlens.cli import default_bundle

    catalog = open_catalog_said(args.catalog) if args.catalog else None
    unseen = read_product_ids(args.unseen_products) if args.unseen_products else None
    report = evaluate(args.bundle or default_bundle(), args.photos, args.out, catalog=catalog,
                      unseen_products=unseen, seed=args.seed, n_impostors=args.impostors,
                      threads=args.threads, progress=not args.no_progress,
                      plots=not args.no_plots, worst=args.worst)
    print(f"\nwrote {', '.join(report.get('files', []))} to {args.out}")
    return 0
