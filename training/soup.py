"""A model soup: one encoder whose weights are the average of several encoders fine-tuned
from the same start (Wortsman et al. 2022, "Model soups").

Two runs of ``auditlens train`` with the same ``--seed`` start from the same weights (the
pretrained trunk, and the same random draw for every new layer) and, trained with
different settings, stay close enough that the average of their weights is a better
model than either: measured with and without background pasting (docs/ablation.md,
"A model soup"). ``--data-seed`` varies the batches and augmentation of a run while
keeping its start, for more ingredients of one recipe. It costs one
more training run and nothing on the device: the soup has the ingredients' size and speed.
Runs started from different seeds are refused: their new layers began from different
random weights, and their average is worse than either run.

``auditlens soup RUN_A RUN_B --out DIR`` writes ``DIR/encoder.keras`` and ``DIR/report.json``
(the ingredients' training reports, and what export and evaluate read from a run's
report: the preprocessing and the products held out), so ``DIR`` exports like a run.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from auditlens.errors import ModelError
from auditlens.files import atomic_write, check_output_dir, file_sha256

SAME_IN_EVERY_INGREDIENT = ("seed", "backbone", "input_size", "latent_dim", "width", "pooling", "trunk_blocks")
"""Training settings the ingredients must share: the seed fixes the starting weights, the
others the architecture (a difference there usually also shows as different weights)."""


def encoder_path(source: str | Path) -> Path:
    """A run folder's ``encoder.keras``, or the ``.keras`` file given."""
    path = Path(source)
    return path / "encoder.keras" if path.is_dir() else path


def run_report(model: Path) -> dict | None:
    """The training report of the run (or soup) that saved ``model``, when it has the
    settings the ingredients must share; None otherwise."""
    from auditlens.export.quantize import training_report

    report = training_report(model)
    return report if report is not None and isinstance(report.get("config"), dict) else None


def check_ingredients(models: Sequence[Path], reports: Sequence[dict | None]) -> tuple[list[str], list[str]]:
    """Refuse ingredients that cannot make a soup; return the encoders' sha256 digests and
    warnings about what could not be checked."""
    if len(models) < 2:
        raise ModelError("a soup needs at least two encoders")
    for model in models:
        if not model.is_file():
            raise ModelError(f"{model}: no such encoder (give a training run's folder or a .keras file)")
    digests = [file_sha256(m) for m in models]
    if len(set(digests)) < len(models):
        raise ModelError("the same encoder is given twice; a soup averages different runs")
    warnings = []
    missing = [str(m) for m, r in zip(models, reports) if r is None]
    if missing:
        warnings.append(f"no training report beside {', '.join(missing)}: cannot check that the runs "
                        "started from the same seed (runs from different seeds average into a worse model)")
    known = [(m, r) for m, r in zip(models, reports) if r is not None]
    for key in SAME_IN_EVERY_INGREDIENT:
        values = {json.dumps(r["config"].get(key)) for _, r in known}
        if len(values) > 1:
            why = (" (runs from different seeds start from different weights, and their average is "
                   "worse than either run; train the runs with the same --seed)" if key == "seed" else "")
            raise ModelError(f"the runs differ in {key}: "
                             + ", ".join(f"{m}: {r['config'].get(key)!r}" for m, r in known) + why)
    held_out = {json.dumps(sorted((r.get("data") or {}).get("held_out_products") or [])) for _, r in known}
    if len(held_out) > 1:
        raise ModelError("the runs held out different products; their soup would have trained on the "
                         "products each run held out, and measure nothing on new products")
    crops = {json.dumps((r.get("preprocess") or {}).get("crop")) for _, r in known}
    if len(crops) > 1:
        raise ModelError("the runs' preprocessing crops differ; the soup's photos would be cut for one of them")
    return digests, warnings


def average_weights(encoders: Sequence) -> None:
    """Set the first encoder's float weights to the mean of every encoder's (in float64);
    other weights (integer counters) are the first encoder's."""
    first = encoders[0]
    shapes = [[tuple(w.shape) for w in e.weights] for e in encoders]
    if any(s != shapes[0] for s in shapes[1:]):
        raise ModelError("the encoders have different architectures (their weights differ in number or "
                         "shape); a soup averages runs of one architecture")
    for i, weight in enumerate(first.weights):
        values = [np.asarray(e.weights[i].numpy()) for e in encoders]
        if np.issubdtype(values[0].dtype, np.floating):
            weight.assign(np.mean(np.stack(values).astype(np.float64), axis=0).astype(values[0].dtype))


def make_soup(sources: Sequence[str | Path], out_dir: str | Path, log=print) -> Path:
    """Average the encoders of ``sources`` (run folders or ``.keras`` files) into
    ``out_dir/encoder.keras`` with its ``report.json``; returns the encoder's path."""
    from auditlens.export.quantize import load_keras_encoder

    out = check_output_dir(out_dir)
    models = [encoder_path(s) for s in sources]
    reports = [run_report(m) for m in models]
    digests, warnings = check_ingredients(models, reports)
    for warning in warnings:
        log(f"auditlens: warning: {warning}")
    target = out / "encoder.keras"
    for path in (target, out / "report.json"):
        if path.exists():
            raise ModelError(f"{path} exists; give a new --out folder for the soup")
    encoders = [load_keras_encoder(m) for m in models]
    average_weights(encoders)
    out.mkdir(parents=True, exist_ok=True)
    encoders[0].save(target)
    known = next((r for r in reports if r is not None), {})
    report = {
        # what every ingredient shares (a soup can then be an ingredient itself)
        "config": {key: (known.get("config") or {}).get(key) for key in SAME_IN_EVERY_INGREDIENT},
        "soup": {
            "method": "uniform average of the encoders' float weights (model soup)",
            "ingredients": [{"model": str(m), "sha256": d, "config": (r or {}).get("config")}
                            for m, d, r in zip(models, digests, reports)],
        },
        "preprocess": known.get("preprocess"),
        "data": {"held_out_products": (known.get("data") or {}).get("held_out_products")},
        "ingredient_reports": reports,
    }
    with atomic_write(out / "report.json") as fh:
        json.dump(report, fh, indent=2)
    log(f"soup of {len(models)} encoders: {target} (report: {out / 'report.json'})")
    return target


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.description = (
        "Average the weights of encoders trained from the same start (auditlens train runs with "
        "the same --seed and different settings, e.g. with and without --no-paste-background, or "
        "another --data-seed) into "
        "one encoder: a model soup, as large and as fast as each of them. Writes OUT/encoder.keras "
        "and OUT/report.json; export OUT/encoder.keras as a run's encoder."
    )
    parser.add_argument("runs", nargs="+", metavar="RUN",
                        help="a training run's folder (its encoder.keras) or a .keras encoder it saved "
                        "(e.g. RUN/checkpoints/encoder_epoch_010.keras); two or more")
    parser.add_argument("--out", required=True, help="a new folder for the soup's encoder.keras and report.json")
    return parser


def run(args: argparse.Namespace) -> int:
    make_soup(args.runs, args.out, log=lambda m: print(m, file=sys.stderr if "warning" in m else sys.stdout))
    return 0
