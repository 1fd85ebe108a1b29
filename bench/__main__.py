"""``python -m bench``: auditlens against classical peers, accuracy, speed, size and scale,
in one run. Prints markdown tables and writes ``results.md``, ``results.json`` and PNG
plots to ``--out`` (default ``bench/results/`` for the full run on grocery-dev,
``bench/results-local/`` otherwise).

``--quick`` is the CI smoke run (a few photos, few repeats, small catalogues: well under a
minute); the default full mode produces the published numbers (a few minutes).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from auditlens.errors import AuditlensError

from .common import (
    DEFAULT_GROCERY,
    DEFAULT_KERAS,
    DEFAULT_MODEL,
    LAYOUTS,
    REPO,
    UsageError,
    conditions,
    data_root,
    load_average,
    measure_interleaved,
    pct,
    pixel_size,
    rel,
    resolve_data,
    table,
)
from .peers import METHOD_NAMES, unknown_methods

SECTIONS = {
    "accuracy": "every method on the same pairs of the scored photos: EER, TAR at FAR 1%, top-1, "
                "time per verification of a data set photo and of a 12 MP phone JPEG",
    "latency": "auditlens alone: encoder inference (int8 / float32, 1 and 2 threads), decoding, "
               "preprocessing and the whole verify of 1 MP and 12 MP JPEGs, stage by stage",
    "scale": "enrolment rate, `auditlens score` throughput, and identify over 1k to 1M enrolled "
             "products (random latents)",
    "memory": "peak RSS of fresh processes: `auditlens verify`, the engine, each method",
}

HELD_OUT = ("held-out EER 15.2-22.3%, TAR at FAR 1% 10.4-14.7%, top-1 28.8-42.1% over three "
            "product folds")
"""The ranges of README.md's fold table ("Products never seen in training", the shipped
recipe and card) for products held out of training; quoted, not measured by the bench
(tests/test_readme.py keeps the two equal)."""


@dataclass(frozen=True)
class Settings:
    """How much work a run does."""

    max_photos: int | None
    timing_photos: int
    timing_repeats: int
    phone_runs: int
    encoder_runs: int
    verify_runs: int
    full_decode_12mp_runs: int
    identify_sizes: tuple[int, ...]
    identify_runs: int
    enroll_repeats: int
    enroll_photos: int
    score_pairs: int
    memory_per_method: bool
    float32: bool


QUICK = Settings(max_photos=16, timing_photos=4, timing_repeats=2, phone_runs=3, encoder_runs=50,
                 verify_runs=8, full_decode_12mp_runs=3, identify_sizes=(1_000, 10_000),
                 identify_runs=5, enroll_repeats=1, enroll_photos=0, score_pairs=200,
                 memory_per_method=False, float32=False)
FULL = Settings(max_photos=None, timing_photos=30, timing_repeats=3, phone_runs=40, encoder_runs=1000,
                verify_runs=200, full_decode_12mp_runs=50,
                identify_sizes=(1_000, 10_000, 100_000, 1_000_000), identify_runs=50,
                enroll_repeats=3, enroll_photos=1000, score_pairs=10_000, memory_per_method=True,
                float32=True)


def parse_args(argv=None) -> argparse.Namespace:
    epilog = "sections (--only):\n" + "\n".join(
        textwrap.fill(what, 88, initial_indent=f"  {name:10s}", subsequent_indent=" " * 12)
        for name, what in SECTIONS.items())
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__, epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CI smoke run: small and fast, numbers not meaningful")
    p.add_argument("--data", default=None,
                   help=f"{LAYOUTS}. Default: shared/data/grocery-dev "
                        "beside the repository (REPO/../shared/data/grocery-dev, whatever the current "
                        "folder) when present, else the repository's models/sample")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                   help="int8 TFLite encoder (default: the shipped models/encoder.tflite)")
    p.add_argument("--keras", type=Path, default=DEFAULT_KERAS,
                   help="Keras encoder converted to float32 TFLite for the float32 timing "
                        "(default: models/default.keras; skipped without it or without TensorFlow)")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for results.md, results.json and the plots (default: bench/results, "
                        "the published figures, for a full run on the default data; else bench/results-local, "
                        "so a quick run or other data never overwrites them)")
    p.add_argument("--only", nargs="+", choices=list(SECTIONS), default=None,
                   help="run only these sections (what each measures: below)")
    p.add_argument("--methods", nargs="+", default=None,
                   help="only these methods, by case-insensitive name prefix (e.g. sift orb auditlens); "
                        "the methods: " + ", ".join(METHOD_NAMES))
    args = p.parse_args(argv)
    unknown = unknown_methods(args.methods or [])
    if unknown:
        p.error(f"--methods: no method named {', '.join(map(repr, unknown))}; "
                f"the methods are {', '.join(METHOD_NAMES)}")
    return args


def default_out(args: argparse.Namespace) -> Path:
    """bench/results (the published figures) for a full run of the shipped models on
    grocery-dev; bench/results-local for anything else, so it never overwrites them."""
    shipped = args.model.resolve() == DEFAULT_MODEL.resolve() and args.keras.resolve() == DEFAULT_KERAS.resolve()
    published = (not (args.quick or args.data or args.only or args.methods) and shipped
                 and (DEFAULT_GROCERY / "classes.csv").is_file())
    return REPO / "bench" / ("results" if published else "results-local")


def check_inputs(args: argparse.Namespace) -> None:
    """Make the paths given absolute (a run reads them from several folders) and check
    them before anything is written; raises :class:`UsageError`."""
    args.model, args.keras = args.model.resolve(), args.keras.resolve()
    if not args.model.is_file():
        raise UsageError(f"no model at {args.model}; pass --model PATH.tflite")
    args.data_root = data_root(args.data)
    if args.out is None:
        args.out = default_out(args)
    args.out = args.out.resolve()
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out}: a file, not a folder; give a folder for results.md, "
                         "results.json and the plots")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    args.command = shlex.join(["python", "-m", "bench", *argv])  # what the report says made it
    settings = QUICK if args.quick else FULL
    sections = args.only or list(SECTIONS)
    with tempfile.TemporaryDirectory(prefix="auditlens-bench-") as tmp:
        try:  # every input checked, a dataset folder imported, before anything is written
            check_inputs(args)
            data = resolve_data(args.data_root, Path(tmp))
            args.out.mkdir(parents=True, exist_ok=True)
        except (UsageError, AuditlensError, OSError) as exc:
            print(f"python -m bench: {exc}", file=sys.stderr)
            return 2
        out: Path = args.out
        if args.data is None and args.data_root != DEFAULT_GROCERY:
            print(f"bench: no grocery-dev at {DEFAULT_GROCERY}: measuring the sample photos "
                  "shipped in models/sample (a handful: accuracy figures are not comparable with "
                  "bench/results; pass --data PATH for a Grocery Store Dataset copy)", file=sys.stderr)
        started = time.perf_counter()
        cond = conditions()
        report = run(args, settings, sections, Path(tmp), cond, data)
    report["conditions"]["load_average_at_end"] = load_average()
    report["conditions"]["wall_seconds"] = round(time.perf_counter() - started, 1)
    md = render(report)
    (out / "results.md").write_text(md, encoding="utf-8")
    (out / "results.json").write_text(json.dumps(report, indent=1, default=_json_default), encoding="utf-8")
    print("\n" + md)
    print(f"wrote {out / 'results.md'}, {out / 'results.json'} and {len(report['plots'])} plots "
          f"in {report['conditions']['wall_seconds']} s")
    return 0


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o))


def log(msg: str) -> None:
    print(msg, flush=True)


def _spread(photos, n):
    """At most ``n`` photos, spread across products (round robin)."""
    if n is None or len(photos) <= n:
        return list(photos)
    by_product: dict[str, list] = {}
    for ph in photos:
        by_product.setdefault(ph.product_id, []).append(ph)
    out, i = [], 0
    while len(out) < n:
        for group in by_product.values():
            if i < len(group) and len(out) < n:
                out.append(group[i])
        i += 1
    return out


def run(args, s: Settings, sections, work: Path, cond: dict, data) -> dict:
    from auditlens.catalog import open_catalog, read_labelled_photos
    from auditlens.device_app.interpreter import Encoder, model_id_of
    from auditlens.export.enroll import EnrollOptions, enroll

    from . import plots
    from .accuracy import METRICS_SOURCE, run_method, time_verifications
    from .latency import encoder_latency, make_phone_jpegs, verify_latency
    from .memory import measure_memory
    from .peers import make_methods
    from .scale import enroll_rate, identify_end_to_end, identify_scale, photo_catalog, score_pairs

    catalog = open_catalog(data.catalog_csv)
    all_photos = [p for p in read_labelled_photos(data.photos_csv) if p.product_id in catalog]
    photos = _spread(all_photos, s.max_photos)
    if len(catalog) < 2 or not photos:
        raise SystemExit(f"python -m bench: {data.name} has {len(catalog)} product(s) and "
                         f"{len(photos)} photo(s) of them; the bench needs at least 2 products and "
                         "1 labelled photo (impostor pairs need another product)")
    model_bytes = args.model.read_bytes()
    encoder = Encoder(model_bytes)
    notes: list[str] = list(data.notes)
    report: dict = {
        "mode": "quick" if args.quick else "full",
        "command": args.command,
        "conditions": cond,
        "data": {"name": data.name, "products": len(catalog), "photos": len(photos),
                 "photos_available": len(all_photos), "photo_size": pixel_size(ph.photo for ph in photos)},
        "model": {"path": rel(args.model), "id": model_id_of(model_bytes), "bytes": len(model_bytes),
                  "input_size": encoder.input_size, "latent_dim": encoder.latent_dim,
                  "input_dtype": str(encoder.input_dtype),
                  "trained_on": trained_on(model_id_of(model_bytes), catalog.ids, data.split)},
        "metrics_source": METRICS_SOURCE,
        "notes": notes, "plots": [], "_lap": [("setup", time.perf_counter())],
    }
    log(f"bench ({report['mode']}): {len(catalog)} products, {len(photos)} photos from {data.name}; "
        f"model {report['model']['id']} ({len(model_bytes) / 1024:.0f} KiB); load {cond['load_average_1_5_15']}")

    bundle = work / "bundle"
    enroll(catalog, bundle, model=args.model, options=EnrollOptions(progress=False))
    groups = [p.group for p in catalog]
    first = photos[0]
    phone = make_phone_jpegs(first.photo, work)

    _lap(report, "accuracy")
    if "accuracy" in sections:
        log("\n## accuracy (same pairs for every method)")
        results, methods = [], []
        for method in make_methods(bundle, args.methods):
            try:
                r = run_method(method, catalog, photos, groups, timing_photos=s.timing_photos, log=log)
            except ImportError as exc:  # a peer's library is missing: `pip install auditlens[bench]`
                notes.append(f"{method.name} skipped: {exc} (install auditlens[bench])")
                log(f"  {method.name:14s} skipped: {exc}")
                continue
            results.append(r)
            methods.append(method)
        log("  timing one verification of every method, in alternation")
        time_verifications(methods, results, s.timing_repeats)
        refs = [m.prepare_reference(next(_refs(catalog, first.product_id))) for m in methods]
        twelve = measure_interleaved([lambda m=m, ref=ref: m.verify(phone["12 MP"], ref)
                                      for m, ref in zip(methods, refs)], s.phone_runs, warmup=1)
        size = report["data"]["photo_size"]
        for r, r12 in zip(results, twelve):
            log(f"  {r.name:14s} verify a {size} photo {r.verify.median:8.2f} ms, a 12 MP JPEG {r12.median:8.2f} ms")
        results = list(zip(results, twelve))
        report["accuracy"] = [{**r.to_dict(), "verify_12mp": r12.to_dict()} for r, r12 in results]
        ours = next(((r, r12) for r, r12 in results if r.name == "auditlens"), None)
        if ours is not None:
            for row, (r, r12) in zip(report["accuracy"], results):
                row["slower_than_auditlens"] = r.verify.median / ours[0].verify.median
                row["slower_than_auditlens_12mp"] = r12.median / ours[1].median
        report["_method_objects"] = [r for r, _ in results]
        labels = {"auditlens": _auditlens_label(report)}  # the peers are not trained
        report["plots"].append(str(plots.roc([r for r, _ in results], args.out / "roc.png", labels)))
        report["plots"].append(str(plots.speed_accuracy([r for r, _ in results], args.out / "speed_accuracy.png",
                                                        size, labels)))

    _lap(report, "latency")
    if "latency" in sections:
        log("\n## latency")
        models = {"int8": args.model}
        if s.float32 and args.keras == DEFAULT_KERAS and args.model.resolve() != DEFAULT_MODEL.resolve():
            # the shipped Keras model is not this model's float twin: name one with --keras
            notes.append("float32 inference skipped: --model is not the shipped model; give its "
                         "Keras encoder with --keras")
        elif s.float32:
            path, note = _float_model(args.keras, work)
            notes.append(note)
            if path is not None:
                models["float32"] = path
        else:
            notes.append("float32 inference skipped in --quick")
        rows = encoder_latency(models, s.encoder_runs, log=log)
        vrows, extra = verify_latency(bundle, first.photo, first.product_id, phone, s.verify_runs,
                                      s.full_decode_12mp_runs, log=log)
        rows += vrows
        report["latency"] = [r.to_dict() for r in rows]
        report["latency_extra"] = extra
        report["plots"].append(str(plots.latency(rows, args.out / "latency.png")))

    _lap(report, "scale")
    if "scale" in sections:
        log("\n## throughput and scale")
        scale: dict = {"enroll": []}
        for as_zip in (False, True):
            scale["enroll"].append({**enroll_rate(catalog, args.model, work / "enroll", s.enroll_repeats,
                                                  as_zip=as_zip), "what": "catalogue originals"})
        if s.enroll_photos and data.extra_csv:
            big = photo_catalog(read_labelled_photos(data.extra_csv), s.enroll_photos)
            for as_zip in (False, True):
                scale["enroll"].append({**enroll_rate(big, args.model, work / "enroll_big", 1, as_zip=as_zip),
                                        "what": "field photos as originals"})
        for e in scale["enroll"]:
            log(f"  enroll {e['originals']} {e['what']} ({e['pixels']}) into a {e['bundle']} bundle: "
                f"{e['per_second']:.0f} originals/s")
        scale["identify"] = identify_scale(list(s.identify_sizes), encoder.latent_dim, s.identify_runs, log=log)
        t = identify_end_to_end(bundle, first.photo, s.verify_runs)
        scale["identify_bundle"] = {"products": len(catalog), **t.to_dict()}
        scale["score"] = score_pairs(bundle, photos, catalog.ids, s.score_pairs, work)
        sc = scale["score"]
        log(f"  score {sc['pairs']} pairs ({sc['photos']} photos, {sc['pairs_per_photo']:.1f} pairs a photo): "
            f"{sc['seconds']:.1f} s, {sc['photos_per_second']:.0f} photos/s, {sc['pairs_per_second']:.0f} pairs/s")
        report["scale"] = scale
        report["plots"].append(str(plots.identify_scale(scale["identify"], args.out / "identify_scale.png")))

    _lap(report, "memory")
    if "memory" in sections:
        log("\n## memory (fresh processes)")
        # the methods that ran (a peer whose library is missing did not), else those asked for
        measured = ({a["method"] for a in report["accuracy"]} if "accuracy" in report
                    else {m.name for m in make_methods(bundle, args.methods)})
        names = [m.name for m in make_methods(bundle, args.methods)
                 if m.name in measured and (s.memory_per_method or m.name == "auditlens")]
        report["memory"] = measure_memory(bundle, phone, first.product_id,
                                          catalog.get(first.product_id).image, first.photo, names, log=log)
    _lap(report, "end")
    report.pop("_method_objects", None)
    report["plots"] = [Path(p).name for p in report["plots"]]
    return report


def trained_on(model_id: str, product_ids, split: str | None) -> str | None:
    """What the report says of auditlens' training, "trained on these products (val split)",
    when the model is the shipped one and these are products it was trained and calibrated
    on: its card (models/encoder.json) names the model and the products its threshold was
    calibrated with (their fingerprint, and their ids where the card weighs rivals), on
    grocery-dev's val photos, and its training report (models/training_report.json) held
    none out. Some of those products (the sample's 10) are trained on too; the split is
    named only for the whole catalogue. None when the bench cannot tell."""
    from auditlens.device_app.bundle import products_fingerprint

    try:
        card = json.loads((REPO / "models" / "encoder.json").read_text(encoding="utf-8"))
        training = json.loads((REPO / "models" / "training_report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    decision = card.get("decision") or {}
    ids = list(product_ids)
    whole = decision.get("products") == products_fingerprint(ids)
    rivals = decision.get("rivals")
    named = rivals.get("products") if isinstance(rivals, dict) else None
    some = isinstance(named, list) and set(ids) <= set(named)
    held_out = (training.get("data") or {}).get("held_out_products")
    if card.get("model_id") != model_id or not (whole or some) or held_out != []:
        return None
    val = whole and split == "val" and decision.get("photos_source") == "val.csv"
    return "trained on these products" + (" (val split)" if val else "")


def _lap(report: dict, section: str) -> None:
    """Seconds spent in each section (the previous one ends where the next begins)."""
    now = time.perf_counter()
    last = report.setdefault("_lap", [("setup", now)])
    laps = report["conditions"].setdefault("section_seconds", {})
    name, since = last[-1]
    laps[name] = round(now - since, 1)
    last.append((section, now))
    if section == "end":
        report.pop("_lap")


def _refs(catalog, product_id):
    from .peers import ProductRef

    p = catalog.get(product_id)
    yield ProductRef(p.product_id, p.image)


def _float_model(keras: Path, work: Path):
    from .floatmodel import export_float32

    return export_float32(keras, work / "encoder_float32.tflite")


# -- the report ---------------------------------------------------------------------------
def render(r: dict) -> str:
    c = r["conditions"]
    v = c["versions"]
    lines = [
        "# auditlens benchmark results",
        "",
        f"Mode **{r['mode']}**{' (smoke run: numbers are not meaningful)' if r['mode'] == 'quick' else ''}; "
        f"generated by `{r['command']}` at {c['started_utc']} UTC "
        f"in {c.get('wall_seconds', '?')} s.",
        "",
        "**Conditions.** " + f"{c['cpu']}, {c['logical_cpus']} logical CPUs, {c['platform']}; "
        f"load average (1/5/15 min) {c['load_average_1_5_15']} at start, {c.get('load_average_at_end')} at end "
        "(the machine is shared: absolute times drift, ratios measured in the same run are the "
        "robust figures). Python " + v["python"] + ", numpy " + v["numpy"] + ", Pillow " + v["pillow"]
        + ", OpenCV " + v["opencv"] + ", scikit-image " + v["scikit-image"] + ", imagehash "
        + v["imagehash"] + ", ai-edge-litert " + v["ai-edge-litert"] + ". Times are wall-clock "
        "medians / 95th percentiles in ms over repeated runs (count in results.json); the encoder "
        "and OpenCV run single-threaded unless a row says otherwise, and numpy's BLAS threads: "
        f"{c.get('blas_threads', 'not recorded')}.",
        "",
        f"**Data.** {r['data']['name']}: {r['data']['products']} products (catalogue originals), "
        f"{r['data']['photos']} field photos of {r['data'].get('photo_size', '?')}. "
        f"**Model** `{r['model']['path']}` id {r['model']['id']}, "
        f"{r['model']['bytes'] / 1024:.0f} KiB, {r['model']['input_size']} px {r['model']['input_dtype']} "
        f"input, {r['model']['latent_dim']}-d latent. Metrics from `{r['metrics_source']}`.",
    ]
    for section in (_accuracy_md, _latency_md, _scale_md, _memory_md):
        lines += section(r)
    goals = _goals(r)
    if goals:
        lines += ["", "## Issue goals", ""]
        if r["mode"] == "quick":
            lines += ["Smoke run: these verdicts rest on a few photos, small catalogues and few repeats, "
                      "and say nothing about the goals; the full run's do.", ""]
        lines += [table(["goal", "measured", "met"], goals)]
    if r["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in r["notes"]]
    lines += ["", "Plots: " + ", ".join(f"[{p}]({p})" for p in r["plots"]), ""]
    return "\n".join(lines)


def _times(ratio: float | None) -> str:
    """A time ratio with two significant figures under 10 (0.061x, 0.12x, 3.3x), whole above."""
    if ratio is None:
        return "n/a"
    return f"{ratio:.0f}x" if ratio >= 10 else f"{ratio:#.2g}x"


def _auditlens_label(r: dict) -> str:
    """The auditlens row's name: whether its figures are on products it was trained on."""
    trained = r["model"].get("trained_on")
    return f"auditlens, {trained}" if trained else "auditlens"


def _training_md(r: dict) -> str:
    trained = r["model"].get("trained_on")
    if not trained:
        return ("auditlens: whether its model was trained on these products is not known to the bench "
                "(not the shipped model with the products it was calibrated on); the peers need no training.")
    val = "(val split)" in trained
    return (f"**auditlens was {trained}**: the shipped model was trained on all {r['data']['products']} "
            "of them (models/training_report.json: none held out)"
            + (" and these val photos calibrated its decision threshold (models/encoder.json) and were "
               "its training run's validation photos" if val else "")
            + "; the peers need no training. For products never seen in training see README.md "
            f"(\"Products never seen in training\") and docs/ablation.md: {HELD_OUT} (figures quoted "
            "from those documents, not measured by this bench).")


def _accuracy_md(r: dict) -> list[str]:
    if "accuracy" not in r:
        return []
    from .accuracy import tar_cell

    memory = r.get("memory", {})
    mem, mem12 = memory.get("per_method_peak_rss_mib", {}), memory.get("per_method_peak_rss_mib_12mp", {})
    size = r["data"].get("photo_size", "data set")
    rows = []
    for a in r["accuracy"]:
        tar = a["tar_at_far_1pct"]
        spread = None if tar is None else {"median": tar, "min": a["tar_at_far_1pct_range"][0],
                                           "max": a["tar_at_far_1pct_range"][1]}
        peaks = [f"{m[a['method']]:.0f}" for m in (mem, mem12) if a["method"] in m] or ["n/a"]
        rows.append([_auditlens_label(r) if a["method"] == "auditlens" else a["method"],
                     pct(a["eer"]), pct(a["eer_hard"]), tar_cell(spread), pct(a["top1"]),
                     f"{a['verify']['median_ms']:.2f} / {a['verify']['p95_ms']:.2f}",
                     f"{a['verify_12mp']['median_ms']:.1f}",
                     _times(a.get("slower_than_auditlens")), _times(a.get("slower_than_auditlens_12mp")),
                     f"{a['reference_bytes']:.0f}", " / ".join(peaks)])
    draws = r["accuracy"][0].get("impostor_draws", 1)
    return ["", "## Accuracy, speed and memory, side by side", "",
            "Protocol: each photo against its own product's original (genuine), 3 random products of "
            "other coarse classes and every other product of its own coarse class (impostors); "
            "EER and TAR at FAR 1% over all those pairs, EER hard = same-class impostors only; "
            "top-1 over the whole catalogue. EER is the first impostor draw's (as `auditlens evaluate` "
            f"reports it); TAR at FAR 1% is the median (min-max) over the protocol's {draws} draws of the "
            "random impostors, n/a where a draw has fewer than 100 impostor pairs (too few to resolve "
            f"1%). *Verify* = decode a {size} photo of the data set from its file, describe "
            "it and score it against the product's prepared reference (auditlens: the whole "
            "`Verifier.verify`, quality and near-copy checks included); *12 MP* = the same for a "
            "4032x3024 quality-90 JPEG, the size a phone camera writes and the device verifies. "
            f"*Time vs auditlens*: the method's median over auditlens' for each photo size. Peak RSS: a "
            f"fresh process preparing one reference and verifying the same photo 5 times "
            f"({memory.get('photo_size', size)} photo / 12 MP JPEG).", "", _training_md(r), "",
            table(["method", "EER", "EER hard", "TAR@FAR1% median (range)", "top-1",
                   f"verify ms, {size} photo (median / p95)", "verify 12 MP ms",
                   f"time vs auditlens, {size} photo", "time vs auditlens, 12 MP", "bytes / reference",
                   f"peak RSS MiB ({memory.get('photo_size', size)} photo / 12 MP)"], rows),
            "", "How each method scores: " + "; ".join(f"**{a['method']}**: {a['describe']}"
                                                      for a in r["accuracy"]) + "."]


def _latency_md(r: dict) -> list[str]:
    if "latency" not in r:
        return []
    rows = [[x["what"], f"{x['median_ms']:.3f}", f"{x['p95_ms']:.3f}", x["runs"], x["note"]]
            for x in r["latency"]]
    lines = ["", "## Latency (auditlens)", "", table(["what", "median ms", "p95 ms", "runs", "note"], rows)]
    ratios = r["latency_extra"]["ratios"]
    lines += ["", "Same-run ratios, each pair timed in alternation: "
              + "; ".join(f"{k} = **{v:.1f}x**" for k, v in ratios.items()) + "."]
    enc = {x["what"]: x["median_ms"] for x in r["latency"] if x["what"].startswith("encoder")}
    if "encoder float32, 1 thread" in enc and "encoder int8, 1 thread" in enc:
        lines[-1] += (f" float32 / int8 inference (1 thread) = "
                      f"**{enc['encoder float32, 1 thread'] / enc['encoder int8, 1 thread']:.1f}x**;")
    if "encoder int8, 2 threads" in enc:
        lines[-1] += (f" 1 / 2 threads (int8) = "
                      f"**{enc['encoder int8, 1 thread'] / enc['encoder int8, 2 threads']:.2f}x**.")
    return lines


def _scale_md(r: dict) -> list[str]:
    if "scale" not in r:
        return []
    sc = r["scale"]
    score = sc["score"]
    cosine = np.mean([x["query_cosine_mean"] for x in sc["identify"]]) if sc["identify"] else float("nan")
    return ["", "## Throughput and scale", "",
            table(["enrol", "bundle", "originals", "originals' size", "seconds (median)", "originals / s",
                   "setup"],
                  [[e["what"], e["bundle"], e["originals"], e.get("pixels", "?"), f"{e['seconds_median']:.2f}",
                    f"{e['per_second']:.0f}",
                    f"{e['workers']} decode threads, {e['interpreter_threads']}-thread interpreter, "
                    f"{e['runs']} run(s), bundle written"] for e in sc["enroll"]]),
            "", f"`auditlens score`: {score['pairs']:,} pairs of {score['photos']} photos, "
            f"{score['pairs_per_photo']:.1f} pairs per photo (each photo decoded and embedded once, then "
            f"scored against each product it is paired with) in {score['seconds']:.2f} s = "
            f"**{score['photos_per_second']:.0f} photos/s** ({score['pairs_per_second']:.0f} pairs/s at "
            f"{score['pairs_per_photo']:.1f} pairs per photo; fewer pairs per photo, fewer pairs/s). "
            f"`Verifier.identify` of one photo against the {sc['identify_bundle']['products']}-product "
            f"bundle: {sc['identify_bundle']['median_ms']:.2f} / {sc['identify_bundle']['p95_ms']:.2f} ms.",
            "", "Identify (top-5) against N enrolled products, random unit latents of the model's "
            "dimension, one reference per product, 1 thread (numpy's BLAS included); each query is a "
            f"stored latent plus Gaussian noise, at cosine {cosine:.2f} to it: where the shipped model "
            "puts a genuine photo, near its decision threshold. *Engine* = `Verifier.rank`, what "
            "`Verifier.identify`, the CLI and the app search: the bundle's float16 latents, scored "
            "whole from a float32 copy while that takes at most 16 MiB (32,768 rows), above that "
            "scanned by an int8 index (one more byte a component) that shortlists "
            "64 products (more when one left out could still rank) whose rows are then scored exactly; "
            "*search.LatentIndex (library)* = the "
            "library's index, which they do not use. *scratch* = peak temporary memory of one query "
            "(tracemalloc); *top-1 agree* = same best product as the exact float32 scan; *top-5 "
            "overlap* = share of the exact scan's top 5 found:",
            "", table(["products", "storage", "median ms", "p95 ms", "latents MB", "scratch MB",
                       "top-1 agree", "top-5 overlap"],
                      [[f"{x['products']:,}", x["storage"], f"{x['median_ms']:.3f}", f"{x['p95_ms']:.3f}",
                        f"{x['latents_bytes'] / 1e6:.1f}", f"{x['query_scratch_bytes'] / 1e6:.1f}",
                        pct(x["top1_agreement"]), pct(x.get("top5_overlap"))] for x in sc["identify"]])]


def _memory_md(r: dict) -> list[str]:
    if "memory" not in r:
        return []
    return ["", "## Memory (peak RSS of fresh processes)", "",
            table(["process", "peak RSS MiB", "detail"],
                  [[x["what"], f"{x['peak_rss_mib']:.0f}",
                    ", ".join(f"{k} {v}" for k, v in x.items()
                              if k not in ("what", "peak_rss_mib", "note") and v != "")]
                   for x in r["memory"]["rows"]])]


def _goals(r: dict) -> list[list[str]]:
    out = []

    def add(goal, measured, ok):
        out.append([goal, measured, "yes" if ok else "**no**"])

    lat = {x["what"]: x for x in r.get("latency", [])}
    if "encoder int8, 1 thread" in lat:
        m = lat["encoder int8, 1 thread"]["median_ms"]
        add("encoder int8 <= 0.5 ms median, 1 thread", f"{m:.3f} ms", m <= 0.5)
    add("model file <= 1 MB", f"{r['model']['bytes'] / 1e6:.3f} MB", r["model"]["bytes"] <= 1e6)
    for label, limit in (("12 MP", 40), ("1 MP", 10)):
        key = f"verify {label} JPEG, draft decode (engine)"
        if key in lat:
            m = lat[key]["median_ms"]
            add(f"verify {label} JPEG <= {limit} ms median, 1 thread", f"{m:.2f} ms", m <= limit)
    _sift_goals(r, add)
    _identify_goals(r, add)
    enr = r.get("scale", {}).get("enroll", [])
    if enr:
        largest = max(e["originals"] for e in enr)
        rates = {e["bundle"]: e["per_second"] for e in enr if e["originals"] == largest}
        pixels = next(e.get("pixels", "?") for e in enr if e["originals"] == largest)
        add(f">= 200 originals enrolled per second, {r['conditions']['logical_cpus']} logical CPUs "
            f"({largest} originals of {pixels})",
            ", ".join(f"{b} bundle {v:.0f} /s" for b, v in rates.items()),
            rates.get("folder", max(rates.values())) >= 200)
    return out


def _sift_goals(r: dict, add) -> None:
    acc = {a["method"]: a for a in r.get("accuracy", [])}
    if "auditlens" not in acc or "SIFT + RANSAC" not in acc:
        return
    ours, sift = acc["auditlens"], acc["SIFT + RANSAC"]
    size = r["data"].get("photo_size", "data set")
    for what, key in ((f"a {size} photo", "verify"), ("a 12 MP JPEG", "verify_12mp")):
        ratio = sift[key]["median_ms"] / ours[key]["median_ms"]
        add(f">= 10x faster per verification than SIFT + RANSAC, {what}", f"{ratio:.1f}x", ratio >= 10)
    trained = r["model"].get("trained_on")
    add("... while far more accurate (EER" + (f"; auditlens {trained})" if trained else ")"),
        f"{pct(ours['eer'])} vs {pct(sift['eer'])}", ours["eer"] < sift["eer"])


def _identify_goals(r: dict, add) -> None:
    from .scale import ENGINE, LIBRARY

    at_100k = {x["storage"]: x for x in r.get("scale", {}).get("identify", []) if x["products"] == 100_000}
    for storage, label in ((ENGINE, "engine (Verifier.rank: identify, CLI, app)"),
                           (f"int8, {LIBRARY}", "search.LatentIndex (library, int8)")):
        if storage in at_100k:
            x = at_100k[storage]
            add(f"identify over 100k <= 20 ms, {label}", f"{x['median_ms']:.2f} ms", x["median_ms"] <= 20)
            add(f"... and <= 50 MB of latents, {label}", f"{x['latents_bytes'] / 1e6:.1f} MB",
                x["latents_bytes"] <= 50e6)


if __name__ == "__main__":
    sys.exit(main())
