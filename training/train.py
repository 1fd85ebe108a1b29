"""Train the encoder: ``auditlens train CATALOG [--photos CSV] [--val-photos CSV] --out DIR``.

A batch holds P products x K views: each product's *clean* original (exactly what the
device embeds as the reference), augmented originals (synthetic field captures) and, where
labelled photos exist, real field photos. The objective (weights in :class:`TrainConfig`):

    metric_weight * supcon + class_weight * cosface + recon_weight * reconstruction
        [+ distill_weight * distillation, with --teacher-features]
        [+ anchor_weight * original-anchored CosFace, with --anchor-weight]

Validation embeds every original and each val photo exactly as the device does (the
original's ``to_model_input``; the photo's ``to_photo_views``, latents pooled), and reports
top-1 (nearest original is the right product) and genuine-vs-impostor EER/AUC of cosine,
separately for products seen in training and products held out (``--holdout-fold``). It
runs on the moving average of the weights (``--ema-decay``); the average with the best
seen-product EER is kept.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from auditlens.catalog import Catalog, LabelledPhoto, open_catalog, read_labelled_photos
from auditlens.device_app.interpreter import l2_normalize
from auditlens.device_app.preprocess import PreprocessSpec, pool_views, stack_inputs
from auditlens.errors import AuditlensError, CatalogError, OutputPathError, TrainingDivergedError
from auditlens.evaluation.protocol import content_key
from auditlens.files import check_output_dir, is_json_object_with
from auditlens.training.config import BACKBONES, POOLINGS, TrainConfig, TrainResult

EVAL_BATCH = 128
MAX_TRAIN_THREADS = 256
"""Most TensorFlow threads ``--threads`` accepts (0: TensorFlow's choice)."""

RECALIBRATION_SEED = 7919
"""Offset of the seed of the batches that BatchNorm statistics are recomputed from."""

COLLAPSED_AUC = 0.6
"""Below this validation AUC on trained products, ``auditlens train`` warns that the encoder
has not learnt to tell products apart (0.5: every latent alike)."""


# -- product folds ------------------------------------------------------------------------
def parse_fold(text: str) -> tuple[int, int]:
    """'k/K' -> (k, K) with 1 <= k <= K, K >= 2."""
    try:
        k, total = (int(part) for part in text.split("/"))
    except ValueError:
        raise ValueError(f"holdout fold must look like 1/3, not {text!r}") from None
    if total < 2 or not 1 <= k <= total:
        raise ValueError(f"holdout fold {text!r}: need 1 <= k <= K and K >= 2")
    return k, total


def holdout_products(product_ids: list[str], fold: str | None) -> set[str]:
    """Ids of the held-out fold: deterministic, independent of catalogue order and seed.

    Products are ordered by the sha256 of their id and dealt round-robin into K folds, so
    every run (and every ablation) holds out the same products.
    """
    if not fold:
        return set()
    k, total = parse_fold(fold)
    ordered = sorted(product_ids, key=lambda p: hashlib.sha256(p.encode()).hexdigest())
    return {pid for i, pid in enumerate(ordered) if i % total == k - 1}


# -- batches ---------------------------------------------------------------------------------
def group_mates(groups: list[str]) -> list[np.ndarray]:
    """For each product, the indices of the other products of its coarse group."""
    arr = np.asarray(groups, dtype=object)
    return [np.flatnonzero((arr == g) & (np.arange(len(arr)) != i)) for i, g in enumerate(arr)]


def sample_products(rng: np.random.Generator, mates_of: list[np.ndarray], size: int,
                    group_pairs: float) -> np.ndarray:
    """``size`` distinct products for one batch, about ``group_pairs`` of them drawn as pairs
    from one coarse group (the hard negatives a uniform draw rarely puts side by side).

    Products without a group mate only fill the uniform part of the batch.
    """
    n = len(mates_of)
    size = min(size, n)
    order = rng.permutation(n)
    pairs_wanted = int(round(size * group_pairs)) // 2
    chosen: list[int] = []
    taken = np.zeros(n, bool)
    for c in order:
        if len(chosen) >= 2 * pairs_wanted:
            break
        free = mates_of[c][~taken[mates_of[c]]]
        if taken[c] or not len(free):
            continue
        mate = int(rng.choice(free))
        chosen += [int(c), mate]
        taken[[c, mate]] = True
    chosen += [int(c) for c in order if not taken[c]][: size - len(chosen)]
    return np.asarray(chosen, np.int64)


# -- made-up products --------------------------------------------------------------------
def sample_variants(rng: np.random.Generator, groups: list[str], chosen: np.ndarray,
                    count: int, real_share: float = 0.5,
                    eligible: np.ndarray | None = None) -> np.ndarray:
    """One variant per chosen product (0: the real product), shared by the products of one
    coarse group in the batch, so same-group pairs stay hard negatives of each other.
    Products whose ``eligible`` flag is False always stay real."""
    out = np.zeros(len(chosen), np.int64)
    if count == 0:
        return out
    by_group: dict[str, int] = {}
    for i, c in enumerate(chosen):
        if eligible is not None and not eligible[c]:
            continue
        g = groups[c]
        if g not in by_group:
            by_group[g] = 0 if rng.random() < real_share else int(rng.integers(1, count + 1))
        out[i] = by_group[g]
    return out


# -- metrics --------------------------------------------------------------------------------
def eer_auc(genuine: np.ndarray, impostor: np.ndarray) -> tuple[float, float, float]:
    """(EER, AUC, threshold at the EER) of scores where genuine should be higher, with the
    definitions `auditlens evaluate` uses."""
    from auditlens.evaluation import metrics

    e = metrics.eer(genuine, impostor)
    return float(e.eer), float(metrics.roc_auc(genuine, impostor)), float(e.threshold)


def verification_metrics(
    queries: np.ndarray, labels: np.ndarray, references: np.ndarray, groups: np.ndarray | None = None
) -> dict:
    """Metrics of query latents against the reference latents (one per product).

    ``labels[i]`` is the reference row of query i. Genuine pairs: each query with its own
    original; impostors: with every other original (and, if ``groups`` is given, a separate
    EER against originals of the same coarse group only: the hard impostors).
    """
    if len(queries) == 0:
        return {"n": 0}
    sims = l2_normalize(queries) @ l2_normalize(references).T
    rows = np.arange(len(queries))
    genuine = sims[rows, labels]
    others = np.ones_like(sims, dtype=bool)
    others[rows, labels] = False
    eer, auc, threshold = eer_auc(genuine, sims[others])
    out = {
        "n": int(len(queries)),
        "top1": float(np.mean(np.argmax(sims, axis=1) == labels)),
        "top5": float(np.mean((np.argsort(-sims, axis=1)[:, :5] == labels[:, None]).any(1))),
        "eer": eer,
        "auc": auc,
        "eer_threshold": threshold,
        "genuine_mean": float(genuine.mean()),
        "impostor_mean": float(sims[others].mean()),
    }
    if groups is not None:
        same = (groups[None, :] == groups[labels][:, None]) & others
        if same.any():
            out["eer_same_group"] = eer_auc(genuine, sims[same])[0]
    return out


# -- data -------------------------------------------------------------------------------------
def _load_stack(sources, spec: PreprocessSpec, size: int | None, what: str, views: bool = False) -> np.ndarray:
    try:
        return stack_inputs(sources, spec, size=size, views=views)
    except AuditlensError as exc:
        raise CatalogError(f"{what}: {exc}") from exc


def _filter_photos(photos: list[LabelledPhoto], catalog: Catalog, source: str) -> list[LabelledPhoto]:
    """``photos`` once each is checked: every product in the catalogue, no file labelled
    with two products (one label is wrong, and the photo would be its own negative)."""
    unknown = sorted({p.product_id for p in photos} - set(catalog.ids))
    if unknown:
        raise CatalogError(f"{source}: product id(s) not in the catalogue: {', '.join(unknown[:5])}")
    labels: dict[str, str] = {}
    for p in photos:
        key = content_key(p)  # the same bytes under two names count as one photo
        if labels.setdefault(key, p.product_id) != p.product_id:
            raise CatalogError(f"{source}: {p.photo} is labelled both {labels[key]} and {p.product_id}; "
                               "one label is wrong: correct it")
    return photos


# -- training -----------------------------------------------------------------------------------
def _configure_tf(config: TrainConfig):
    import tensorflow as tf

    if config.threads:
        try:  # only possible before TensorFlow's runtime starts (first op)
            tf.config.threading.set_intra_op_parallelism_threads(config.threads)
            tf.config.threading.set_inter_op_parallelism_threads(config.threads)
        except RuntimeError:
            pass
    import keras

    keras.utils.set_random_seed(config.seed)
    return tf


RUN_FILES = ("encoder.keras", "autoencoder.keras", "report.json", "augment_grid.png",
             "training_curves.png", "latent_preview.png")
"""What a run writes into its folder, besides ``checkpoints/``."""


REPLACED_RUN = ".replaced-run"
"""Where ``--overwrite`` keeps the earlier run's files until the new run has a checkpoint."""


def earlier_run_files(out: Path, *, overwrite: bool = False) -> list[Path]:
    """The files of an earlier run in ``out``, which the new one would overwrite one by one
    (a run stopped part way would leave a mix of both). Refused unless ``overwrite``; then
    :func:`clear_run_folder` moves them aside once the new run's inputs have loaded. A
    folder holding files of a run's names that no run wrote (another command's
    report.json) is refused either way. Other files in the folder are kept."""
    check_output_dir(out)
    checkpoints = out / "checkpoints"
    earlier = [out / name for name in RUN_FILES if (out / name).exists()]
    if checkpoints.is_dir():
        earlier += sorted(p for p in checkpoints.iterdir()
                          if p.suffix == ".keras" or p.name.endswith(".weights.h5"))
    if not earlier:
        return []
    names = f"{', '.join(p.name for p in earlier[:3])}{', ...' if len(earlier) > 3 else ''}"
    if not _is_training_run(out):
        raise OutputPathError(f"--out {out} holds {names}, not written by a training run; choose "
                              "another --out")
    if not overwrite:
        raise OutputPathError(f"--out {out} holds an earlier training run ({names}); choose another "
                              "--out, or pass --overwrite to replace it")
    return earlier


def _is_training_run(out: Path) -> bool:
    """Whether ``out`` holds a run's report or a run's own checkpoint files."""
    return (any((out / "checkpoints" / name).is_file() for name in ("last.weights.h5", "best.weights.h5"))
            or is_json_object_with(out / "report.json", {"config", "history"}))


def clear_run_folder(out: Path, earlier: list[Path]) -> Path | None:
    """Move an earlier run's files (:func:`earlier_run_files`) into ``out/.replaced-run``
    (replacing one kept there before), make ``checkpoints/``, and return where they went:
    :func:`discard_unfinished_run` puts them back when the new run fails before its first
    checkpoint; a finished run deletes them."""
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    if not earlier:
        return None
    kept = out / REPLACED_RUN
    shutil.rmtree(kept, ignore_errors=True)
    _move_files(earlier, out, kept)
    return kept


def _move_files(files: list[Path], src: Path, dst: Path) -> None:
    """Move each of ``files`` (all under ``src``) to the same place under ``dst``."""
    for path in files:
        target = dst / path.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        path.replace(target)


def discard_unfinished_run(out: Path, *, made_folder: bool, kept: Path | None = None) -> None:
    """After a run failed before its first checkpoint: remove what it wrote (its augmentation
    grid, the empty ``checkpoints/``, ``out`` itself if the run made it and nothing else is in
    it) and put back the earlier run ``--overwrite`` moved to ``kept``, so that nothing is
    lost and the same command can run again. A run that saved a checkpoint is kept (its
    epochs can still be exported), and so is ``kept``. Cleaning up never hides the error."""
    checkpoints = out / "checkpoints"
    with contextlib.suppress(OSError):
        if checkpoints.is_dir() and any(checkpoints.iterdir()):
            return
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
        if kept is not None and kept.is_dir():
            _move_files(sorted(p for p in kept.rglob("*") if p.is_file()), kept, out)
            shutil.rmtree(kept)
        for folder in (checkpoints, out) if made_folder else (checkpoints,):
            with contextlib.suppress(OSError):  # not empty: someone else's files stay
                folder.rmdir()


def _check_config(config: TrainConfig) -> None:
    """Refuse settings that cannot train, before anything is read or written."""
    for name, value, least in (("epochs", config.epochs, 1), ("steps_per_epoch", config.steps_per_epoch, 1),
                               ("products_per_batch", config.products_per_batch, 2),
                               ("views_per_product", config.views_per_product, 2)):
        if value < least:
            raise ValueError(f"--{name.replace('_', '-')} must be at least {least}, not {value}")
    if config.backbone == "mobilenet_v2" and not 1 <= config.trunk_blocks <= 17:
        raise ValueError(f"--trunk-blocks {config.trunk_blocks} is outside MobileNetV2's blocks 1 to 17")
    frozen = config.freeze_blocks + config.freeze_late
    if frozen and (config.backbone != "mobilenet_v2" or not config.backbone_weights):
        raise ValueError("--freeze-blocks and --freeze-late keep pretrained blocks as they are: they "
                         "need --backbone mobilenet_v2 and --backbone-weights")
    if min(config.freeze_blocks, config.freeze_late) < 0 or frozen >= config.trunk_blocks:
        raise ValueError(f"--freeze-blocks {config.freeze_blocks} and --freeze-late {config.freeze_late} "
                         f"must leave a block of the {config.trunk_blocks}-block trunk to train")
    if config.photos and config.views_per_product < 3:
        raise ValueError(f"--views-per-product {config.views_per_product} leaves no room for a field "
                         "photo beside the original and its augmented copy: use 3 or more with --photos")
    if config.stop_epoch is not None and not 1 <= config.stop_epoch <= config.epochs:
        raise ValueError(f"--stop-epoch {config.stop_epoch} is outside the schedule's epochs 1 to {config.epochs}")
    if not 0.0 <= config.group_pairs <= 1.0:
        raise ValueError(f"--group-pairs {config.group_pairs} is not a share within 0..1")
    if not config.temperature > 0 or not config.cosface_scale > 0:
        raise ValueError(f"--temperature {config.temperature} and --cosface-scale {config.cosface_scale} "
                         "must both be more than 0")
    if not 0.0 <= config.cosface_margin < 1.0:
        raise ValueError(f"--cosface-margin {config.cosface_margin} is not a cosine margin within 0..1")
    if not 0.0 <= config.arcface_margin < math.pi / 2:
        raise ValueError(f"--arcface-margin {config.arcface_margin} is not an angle within 0..pi/2 (radians)")
    if config.minutes is not None and not config.minutes > 0:
        raise ValueError(f"--minutes {config.minutes} must be more than 0 (leave it out for no budget)")
    for flag, value, least in (("--input-size", config.input_size, 16), ("--latent-dim", config.latent_dim, 1),
                               ("--width", config.width, 1)):
        if value < least:
            raise ValueError(f"{flag} must be at least {least}, not {value}")
    if config.input_size > 1024:
        raise ValueError(f"--input-size {config.input_size} is more than 1024 pixels")
    for flag, value in (("--seed", config.seed), ("--data-seed", config.data_seed)):
        if value is not None and not 0 <= value < 2**32:
            raise ValueError(f"{flag} {value} is outside 0 to 2**32 - 1")
    if not 0 <= config.threads <= MAX_TRAIN_THREADS:
        raise ValueError(f"--threads {config.threads} is outside 0 (TensorFlow's choice) to {MAX_TRAIN_THREADS}")
    if not (math.isfinite(config.learning_rate) and config.learning_rate > 0):
        raise ValueError(f"--lr {config.learning_rate} must be a number more than 0")
    for flag, value in (("--weight-decay", config.weight_decay), ("--backbone-lr-scale", config.backbone_lr_scale),
                        ("--metric-weight", config.metric_weight), ("--class-weight", config.class_weight),
                        ("--recon-weight", config.recon_weight), ("--distill-weight", config.distill_weight),
                        ("--anchor-weight", config.anchor_weight)):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{flag} {value} must be a number of at least 0")
    if not 0.0 <= config.ema_decay < 1.0:
        raise ValueError(f"--ema-decay {config.ema_decay} is not a decay within 0..1 (1 excluded; 0: raw weights)")
    if isinstance(config.bn_batches, bool) or not isinstance(config.bn_batches, int) or config.bn_batches < 0:
        raise ValueError(f"--bn-batches {config.bn_batches!r} is not a whole number of at least 0")
    if config.pseudo_kinds and not config.pseudo_products:
        raise ValueError("--pseudo-kinds picks which products get made-up variants: it needs --pseudo-products")


def _read_backbone(config: TrainConfig, log) -> dict | None:
    """The pretrained trunk's weights (``--backbone-weights``), read or refused before any image."""
    from auditlens.training.pretrained import read_torch_state_dict

    if config.backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {config.backbone!r}; choose from {', '.join(BACKBONES)}")
    if not config.backbone_weights:
        note = _random_trunk_note(config)
        if note:
            log(f"encoder trunk: {note}")
        return None
    if config.backbone != "mobilenet_v2":
        raise ValueError("--backbone-weights needs --backbone mobilenet_v2")
    state = read_torch_state_dict(config.backbone_weights)
    log(f"encoder trunk: MobileNetV2 blocks 1-{config.trunk_blocks} from {config.backbone_weights}")
    return state


def _random_trunk_note(config: TrainConfig) -> str | None:
    """What to say of a MobileNetV2 trunk started from random weights (no
    ``--backbone-weights``): allowed, but not the ImageNet start the recipe is measured with."""
    if config.backbone != "mobilenet_v2" or config.backbone_weights:
        return None
    return (f"MobileNetV2 blocks 1-{config.trunk_blocks} start from random weights, not ImageNet's: "
            "give --backbone-weights mobilenet_v2-b0353104.pth for the shipped recipe's start "
            "(docs/training.md says where the file comes from)")


# -- what a run learns from ---------------------------------------------------------------
@dataclass
class TrainingData:
    """The catalogue's split and every training image, cached through ``load_image`` and the
    device's ``to_model_input`` (the augmenter's sources a little larger, for its crops)."""

    catalog: Catalog
    held_out: set[str]
    """Products left out of training (``--holdout-fold``)."""
    train_ids: list[str]
    pseudo_eligible: np.ndarray
    """Per trained product: whether it gets made-up variants (``--pseudo-kinds``)."""
    originals_ref: np.ndarray
    """Every original, exactly the input the device embeds as its reference."""
    originals_big: np.ndarray
    """The trained products' originals at the cache size, and their object masks."""
    masks: np.ndarray
    photos: list[LabelledPhoto]
    photo_images: np.ndarray
    photo_labels: np.ndarray
    """Each training photo's product, as an index into ``train_ids``."""

    @property
    def ids(self) -> list[str]:
        return self.catalog.ids

    @functools.cached_property
    def photoless_note(self) -> str | None:
        """What to say when some trained products have field photos and others none (worked
        out once: said when the data is loaded and again at the end of the run)."""
        return photoless_warning(self.train_ids, self.photos)

    @property
    def originals_clean(self) -> np.ndarray:
        """The trained products' reference inputs, in ``train_ids`` order."""
        ref_index = {pid: i for i, pid in enumerate(self.ids)}
        return self.originals_ref[[ref_index[p] for p in self.train_ids]]

    @property
    def photos_of(self) -> list[np.ndarray]:
        """For each trained product, the indices of its training photos."""
        return [np.flatnonzero(self.photo_labels == c) for c in range(len(self.train_ids))]


@dataclass
class ValidationSet:
    """Val photos embedded as the device does (the spec's views, pooled), or augmented
    originals when there are none."""

    images: np.ndarray
    views: int
    labels: np.ndarray
    """Each query's product, as an index into the catalogue's ids."""
    seen: np.ndarray
    """Whether each query's product was trained on."""
    source: str
    also_trained: int = 0
    """Validation photos that are training photos too (the same file): their figures read high."""


def _choose_products(config: TrainConfig, catalog: Catalog) -> tuple[set[str], list[str], np.ndarray]:
    """(held-out ids, trained ids, which trained products get made-up variants), refused
    before any image is read when nothing could train."""
    ids = catalog.ids
    held_out = holdout_products(ids, config.holdout_fold)
    train_ids = [p for p in ids if p not in held_out]
    if config.holdout_fold and not held_out:
        raise CatalogError(f"--holdout-fold {config.holdout_fold} holds out none of the {len(ids)} products; "
                           "choose fewer folds")
    if len(train_ids) < 2:
        raise CatalogError(f"{len(train_ids)} product(s) to train on"
                           + (f" ({len(held_out)} held out)" if held_out else "")
                           + ": the encoder learns by telling products apart, so it needs at least 2")
    kinds = {k.casefold() for k in config.pseudo_kinds}
    eligible = np.array([not kinds or catalog.get(p).kind.casefold() in kinds for p in train_ids])
    if config.pseudo_products and not eligible.any():
        raise CatalogError(f"--pseudo-kinds {', '.join(config.pseudo_kinds)}: no trained product "
                           "is of these kinds")
    return held_out, train_ids, eligible


def _training_photos(config: TrainConfig, catalog: Catalog, train_ids: list[str]) -> list[LabelledPhoto]:
    """The labelled photos of trained products, at most ``max_photos_per_product`` each."""
    if not config.photos:
        return []
    trained = set(train_ids)
    photos = [p for p in _filter_photos(read_labelled_photos(config.photos), catalog, config.photos)
              if p.product_id in trained]
    if not config.max_photos_per_product:
        return photos
    kept: dict[str, int] = {}
    capped = []
    for p in photos:
        if kept.get(p.product_id, 0) < config.max_photos_per_product:
            kept[p.product_id] = kept.get(p.product_id, 0) + 1
            capped.append(p)
    return capped


def load_training_data(config: TrainConfig, spec: PreprocessSpec, log) -> TrainingData:
    """Split the catalogue and cache every original and training photo."""
    from auditlens.training.augment import cache_size, object_mask

    catalog = open_catalog(config.catalog)
    for note in catalog.notes:
        log(f"auditlens: warning: {note}")
    held_out, train_ids, eligible = _choose_products(config, catalog)
    csize = cache_size(config.input_size, config.cache_scale)
    log(f"caching {len(catalog)} originals ...")
    originals_ref = _load_stack([p.image for p in catalog], spec, None, "original")  # exact input
    originals_big = _load_stack([catalog.get(p).image for p in train_ids], spec, csize, "original")
    masks = np.stack([object_mask(img) for img in originals_big])[..., None]
    photos = _training_photos(config, catalog, train_ids)
    log(f"caching {len(photos)} training photos ...")
    photo_images = _load_stack([p.photo for p in photos], spec, csize, "training photo")
    train_index = {pid: i for i, pid in enumerate(train_ids)}
    photo_labels = np.array([train_index[p.product_id] for p in photos], np.int64)
    data = TrainingData(catalog, held_out, train_ids, eligible, originals_ref, originals_big, masks,
                        photos, photo_images, photo_labels)
    note = data.photoless_note
    if note:
        log(f"auditlens: warning: {note}")
    return data


def _teacher_targets(config: TrainConfig, data: TrainingData, log):
    """(teacher, its centred feature of each trained original, of each training photo) for
    ``--teacher-features``, or None."""
    if not config.teacher_features:
        return None
    from auditlens.training.teacher import centred_targets, load_teacher_features

    teacher = load_teacher_features(config.teacher_features)
    t_orig = teacher.lookup([data.catalog.get(p).image for p in data.train_ids], "original")
    t_photo = teacher.lookup([p.photo for p in data.photos], "training photo")
    t_mean = np.concatenate([t_orig, t_photo]).mean(axis=0)
    log(f"distilling {teacher.dim}-d teacher features from {teacher.source}")
    return teacher, centred_targets(t_orig, t_mean), centred_targets(t_photo, t_mean)


def load_validation(config: TrainConfig, data: TrainingData, spec: PreprocessSpec,
                    backgrounds: np.ndarray, log) -> ValidationSet:
    """The val photos (``--val-photos``), or four fixed augmented views of every original."""
    ref_index = {pid: i for i, pid in enumerate(data.ids)}
    if config.val_photos:
        val = _filter_photos(read_labelled_photos(config.val_photos), data.catalog, config.val_photos)
        if not val:
            raise CatalogError(f"{config.val_photos}: no validation photo of a catalogue product")
        if all(p.product_id in data.held_out for p in val):  # refused before any photo is decoded
            raise CatalogError(f"{config.val_photos}: no validation photo shows a trained product (all "
                               f"{len(val)} are of held-out products); checkpoints are chosen on trained "
                               "products, so add photos of some of them")
        log(f"caching {len(val)} validation photos ...")
        images = _load_stack([p.photo for p in val], spec, None, "validation photo", views=True)
        labels = np.array([ref_index[p.product_id] for p in val], np.int64)
        views, source = spec.num_views, config.val_photos
        trained = {os.path.realpath(p.photo) for p in data.photos}
        also_trained = sum(os.path.realpath(p.photo) in trained for p in val)
        if also_trained:
            log(f"warning: {overlap_warning(also_trained, len(val))}")
    else:
        import tensorflow as tf

        from auditlens.training.augment import AugmentSwitches, CaptureAugmenter, object_mask

        val_aug = CaptureAugmenter(config.input_size, backgrounds, AugmentSwitches(), seed=config.seed + 999)
        all_big = _load_stack([p.image for p in data.catalog], spec, data.originals_big.shape[1], "original")
        all_masks = np.stack([object_mask(img) for img in all_big])[..., None]
        reps, chunk = 4, 64  # augmented in chunks: one batch of every view would take GBs
        rep_big, rep_masks = np.repeat(all_big, reps, 0), np.repeat(all_masks, reps, 0)
        images = np.concatenate([
            val_aug.originals(tf.constant(rep_big[i:i + chunk]), tf.constant(rep_masks[i:i + chunk]))
            .numpy().astype(np.uint8) for i in range(0, len(rep_big), chunk)])
        labels = np.repeat(np.arange(len(data.ids)), reps)
        views, source, also_trained = 1, "augmented originals (no --val-photos)", 0
    seen = np.array([data.ids[c] not in data.held_out for c in labels], bool)
    return ValidationSet(images, views, labels, seen, source, also_trained)


def photoless_warning(train_ids: list[str], photos: list[LabelledPhoto]) -> str | None:
    """What to tell an engineer whose trained products have field photos, but not all of them.

    A product trained from its original alone beside products trained with photos learns
    the studio look as its own: on one product fold (docs/ablation.md, "New products'
    originals in training, without their photos") photos of such products were verified
    worse than if they had been left out of training. A catalogue without any photos trains
    every product alike and is not warned about."""
    with_photos = {p.product_id for p in photos}
    missing = [p for p in train_ids if p not in with_photos]
    if not with_photos or not missing:
        return None
    return (f"{len(missing)} of the {len(train_ids)} trained products have no training photo "
            f"(first: {missing[0]!r}) and train from their originals alone; measured on one product "
            "fold, such products were verified worse than products left out of training (top-1 37.9% "
            "-> 23.8%, docs/ablation.md): leave them out of the training catalogue and enrol them "
            "as new products, or add photos of them")


def overlap_warning(also_trained: int, val_photos: int) -> str:
    """What to tell an engineer whose validation photos are training photos too."""
    return (f"{also_trained} of the {val_photos} validation photos are training photos too (is "
            "--val-photos the --photos file?): the validation figures and the epoch chosen on them "
            "read too well; validate on photos kept out of training")


# -- the networks and one optimizer step ------------------------------------------------------
@dataclass
class _Networks:
    """The encoder and the training-only parts around it, with their optimizers: the
    pretrained trunk (``trunk``) learns at ``--backbone-lr-scale`` of the rest's rate."""

    encoder: object
    decoder: object
    autoencoder: object
    head: object
    projection: object | None
    """Latent -> the teacher's feature space (``--teacher-features`` only)."""
    optimizer: object
    trunk_optimizer: object
    trainable: list
    trunk: list

    def set_learning_rate(self, lr: float, trunk_scale: float) -> None:
        self.optimizer.learning_rate.assign(lr)
        self.trunk_optimizer.learning_rate.assign(lr * trunk_scale)


def _build_networks(config: TrainConfig, mspec, backbone_state: dict | None, n_classes: int,
                    teacher_dim: int | None) -> _Networks:
    import keras

    from auditlens.training.losses import CosFaceHead
    from auditlens.training.model import build_autoencoder, build_decoder, build_encoder

    encoder = build_encoder(mspec, backbone_state)
    decoder = build_decoder(mspec)
    autoencoder = build_autoencoder(encoder, decoder)
    head = CosFaceHead(n_classes, name="cosface")
    head.build((None, config.latent_dim))
    optimizer = keras.optimizers.AdamW(config.learning_rate, weight_decay=config.weight_decay)
    # A pretrained trunk (layers named mb*) gets its own optimizer at a lower rate; its stem
    # (mb_*) and first blocks (mbN_*) stay as loaded with --freeze-blocks, its last blocks
    # with --freeze-late, BatchNorm included.
    frozen = {"mb", *(f"mb{i}" for i in range(1, config.freeze_blocks + 1))} if config.freeze_blocks else set()
    frozen |= {f"mb{i}" for i in range(config.trunk_blocks - config.freeze_late + 1, config.trunk_blocks + 1)}
    for layer in encoder.layers:
        if layer.name.split("_")[0] in frozen:
            layer.trainable = False
    trunk = [w for layer in encoder.layers if backbone_state is not None and layer.name.startswith("mb")
             for w in layer.trainable_weights]
    trunk_ids = {id(w) for w in trunk}
    trunk_optimizer = keras.optimizers.AdamW(config.learning_rate * config.backbone_lr_scale,
                                             weight_decay=config.weight_decay)
    trainable = ([w for w in encoder.trainable_weights if id(w) not in trunk_ids]
                 + decoder.trainable_weights + head.trainable_weights)
    projection = None
    if teacher_dim:
        projection = keras.layers.Dense(teacher_dim, use_bias=False, name="distill")
        projection.build((None, config.latent_dim))
        trainable += projection.trainable_weights
    optimizer.build(trainable)
    if trunk:
        trunk_optimizer.build(trunk)
    return _Networks(encoder, decoder, autoencoder, head, projection, optimizer, trunk_optimizer,
                     trainable, trunk)


def _make_train_step(config: TrainConfig, nets: _Networks, data: TrainingData, batch_images,
                     variants: list, teacher_targets, average):
    """The compiled step on one batch, given as indices (clean originals, augmented originals,
    photos, each image's made-up variant, made into images by ``batch_images``): the weighted
    losses, clipped gradients, both optimizers and the weight average. Returns the loss terms."""
    import tensorflow as tf

    from auditlens.training.augment import variant_images
    from auditlens.training.losses import (
        arcface_loss,
        cosface_loss,
        distill_loss,
        original_anchor_loss,
        reconstruction_loss,
        supcon_loss,
    )

    encoder, decoder, head, projection = nets.encoder, nets.decoder, nets.head, nets.projection
    n_train = len(data.train_ids)
    recon_t = tf.image.resize(tf.cast(tf.constant(data.originals_clean), tf.float32) / 255.0,
                              [config.recon_size] * 2, antialias=True)
    has_photos = len(data.photo_images) > 0
    photo_labels_t = tf.constant(data.photo_labels.astype(np.int32) if has_photos else np.zeros(1, np.int32))
    if teacher_targets is not None:
        teacher, t_orig, t_photo = teacher_targets
        t_orig_t = tf.constant(t_orig)
        t_photo_t = tf.constant(t_photo if len(t_photo) else np.zeros((1, teacher.dim), np.float32))
    weights = (config.metric_weight, config.class_weight, config.recon_weight)
    params = nets.trainable + nets.trunk
    as_variant = variant_images(variants)
    idx_spec = tf.TensorSpec([None], tf.int32)
    if config.arcface_margin > 0:
        def class_loss(cosines, labels):
            return arcface_loss(cosines, labels, config.cosface_scale, config.arcface_margin)
    else:
        def class_loss(cosines, labels):
            return cosface_loss(cosines, labels, config.cosface_scale, config.cosface_margin)

    @tf.function(input_signature=[idx_spec, idx_spec, idx_spec, idx_spec])
    def train_step(clean_idx, aug_idx, photo_idx, variant):
        products = tf.concat([clean_idx, aug_idx, tf.gather(photo_labels_t, photo_idx)], 0)
        images = batch_images(clean_idx, aug_idx, photo_idx, variant)
        labels = products + n_train * variant
        target = as_variant(tf.gather(recon_t, products), variant)
        with tf.GradientTape() as tape:
            latents = encoder(images, training=True)
            l_metric = supcon_loss(latents, labels, config.temperature)
            l_class = class_loss(head(latents), labels)
            recon = decoder(latents, training=True)
            l_recon = reconstruction_loss(recon, target)
            total = weights[0] * l_metric + weights[1] * l_class + weights[2] * l_recon
            if config.anchor_weight > 0:
                l_anchor = original_anchor_loss(latents, labels, tf.shape(clean_idx)[0],
                                                config.cosface_scale, config.cosface_margin)
                total += config.anchor_weight * l_anchor
            else:
                l_anchor = tf.constant(0.0)
            if teacher_targets is not None:
                aim = tf.concat([tf.gather(t_orig_t, clean_idx), tf.gather(t_orig_t, aug_idx),
                                 tf.gather(t_photo_t, photo_idx)], 0)
                real = tf.equal(variant, 0)  # made-up products have no teacher feature
                l_distill = distill_loss(projection(latents), aim, real)
                total += config.distill_weight * l_distill
            else:
                l_distill = tf.constant(0.0)
            # BatchNorm has no regularisers here; AdamW's decay handles the weights.
        grads = tape.gradient(total, params)
        grads = [tf.zeros_like(w) if g is None else g for g, w in zip(grads, params)]
        grads, _ = tf.clip_by_global_norm(grads, 5.0)
        nets.optimizer.apply_gradients(zip(grads[:len(nets.trainable)], nets.trainable))
        if nets.trunk:
            nets.trunk_optimizer.apply_gradients(zip(grads[len(nets.trainable):], nets.trunk))
        average.update()
        return total, l_metric, l_class, l_recon, l_distill, l_anchor

    return train_step


def _batch_images(data: TrainingData, variants: list):
    """A maker of compiled functions, one per augmenter, that make one batch's images
    (float32 0..255) from the indices :func:`_batch_sampler` draws: the clean originals,
    augmented originals and augmented photos, each turned into its made-up variant. The
    cached images become tensors once, whichever augmenters draw on them."""
    import tensorflow as tf

    from auditlens.training.augment import variant_images

    side = data.originals_big.shape[1]  # the cache size
    orig_big_t = tf.constant(data.originals_big)
    masks_t = tf.constant(data.masks)
    clean_t = tf.constant(data.originals_clean)
    has_photos = len(data.photo_images) > 0
    photos_t = tf.constant(data.photo_images if has_photos else np.zeros((1, side, side, 3), np.uint8))
    as_variant = variant_images(variants)
    idx_spec = tf.TensorSpec([None], tf.int32)

    def with_augmenter(augmenter):
        @tf.function(input_signature=[idx_spec, idx_spec, idx_spec, idx_spec])
        def batch_images(clean_idx, aug_idx, photo_idx, variant):
            clean = tf.cast(tf.gather(clean_t, clean_idx), tf.float32)
            aug = augmenter.originals(tf.gather(orig_big_t, aug_idx), tf.gather(masks_t, aug_idx))
            photo = augmenter.photos(tf.gather(photos_t, photo_idx))
            return as_variant(tf.concat([clean, aug, photo], 0), variant)

        return batch_images

    return with_augmenter


def _recalibrator(config: TrainConfig, encoder, data: TrainingData, images_with, backgrounds: np.ndarray,
                  data_seed: int):
    """A function that recomputes ``encoder``'s BatchNorm statistics from
    ``config.bn_batches`` training batches (None when it is 0), for :func:`_fit` to call
    on a validated encoder that has :func:`collapsed`. Its batches and their
    augmentation draw from their own generators, so the training batches are those of a
    run without it."""
    if not config.bn_batches:
        return None
    import tensorflow as tf

    from auditlens.training.augment import AugmentSwitches, CaptureAugmenter
    from auditlens.training.averaging import recalibrate_batchnorm

    augmenter = CaptureAugmenter(config.input_size, backgrounds, AugmentSwitches.from_config(config),
                                 seed=data_seed + RECALIBRATION_SEED)
    images = images_with(augmenter)
    sample_batch = _batch_sampler(config, data, np.random.default_rng(data_seed + RECALIBRATION_SEED))

    def recalibrate() -> int:
        return recalibrate_batchnorm(encoder, (images(*(tf.constant(a) for a in sample_batch()))
                                               for _ in range(config.bn_batches)))

    return recalibrate


def _batch_sampler(config: TrainConfig, data: TrainingData, rng: np.random.Generator):
    """A function drawing one batch's indices for the train step: P products x K views each,
    the clean original, photos where the product has them, augmented originals for the rest."""
    P = min(config.products_per_batch, len(data.train_ids))
    K = max(config.views_per_product, 2)
    train_groups = [data.catalog.get(p).group or p for p in data.train_ids]
    mates_of = group_mates(train_groups)
    photos_of = data.photos_of

    def sample_batch() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Indices of the clean originals, augmented originals and photos of one batch, and
        the made-up variant of every image (in that order)."""
        chosen = sample_products(rng, mates_of, P, config.group_pairs)
        chosen_variant = sample_variants(rng, train_groups, chosen, config.pseudo_products,
                                         eligible=data.pseudo_eligible)
        aug, pho, aug_var, pho_var = [], [], [], []
        for c, v in zip(chosen, chosen_variant):
            have = photos_of[c]
            n_photo = min(K - 2, len(have)) if len(have) else 0
            if n_photo:
                pho.extend(rng.choice(have, size=n_photo, replace=len(have) < n_photo))
                pho_var.extend([v] * n_photo)
            aug.extend([c] * (K - 1 - n_photo))
            aug_var.extend([v] * (K - 1 - n_photo))
        variant = np.concatenate([chosen_variant, aug_var, pho_var]).astype(np.int32)
        return (chosen.astype(np.int32), np.asarray(aug, np.int32), np.asarray(pho, np.int32), variant)

    return sample_batch


def _evaluator(config: TrainConfig, encoder, data: TrainingData, val: ValidationSet):
    """A function measuring the encoder as it is now on the validation set: ``{"all", "seen"
    [, "unseen"]}`` of :func:`verification_metrics`. "all" and "unseen" are scored against
    every original; "seen", which chooses the checkpoint, against the trained products'
    originals only, so that products held out of training never steer the choice."""
    import tensorflow as tf

    groups = np.array([p.group or p.product_id for p in data.catalog])
    trained = np.array([p.product_id not in data.held_out for p in data.catalog])
    trained_column = np.cumsum(trained) - 1  # a trained product's column among trained originals

    @tf.function(input_signature=[tf.TensorSpec([None, config.input_size, config.input_size, 3], tf.float32)])
    def embed_fn(x):
        return encoder(x, training=False)

    def embed(images: np.ndarray) -> np.ndarray:
        return np.concatenate([
            embed_fn(tf.constant(images[i : i + EVAL_BATCH], tf.float32)).numpy()
            for i in range(0, len(images), EVAL_BATCH)
        ]) if len(images) else np.zeros((0, config.latent_dim), np.float32)

    def evaluate() -> dict:
        refs = embed(data.originals_ref)
        q = pool_views(l2_normalize(embed(val.images)), val.views)
        result = {"all": verification_metrics(q, val.labels, refs, groups)}
        if data.held_out:
            result["seen"] = verification_metrics(
                q[val.seen], trained_column[val.labels[val.seen]], refs[trained], groups[trained])
            result["unseen"] = verification_metrics(q[~val.seen], val.labels[~val.seen], refs, groups)
        else:
            result["seen"] = result["all"]
        return result

    return evaluate


def scheduled_learning_rate(config: TrainConfig, step: int, elapsed: float) -> float:
    """The rate of optimizer step ``step`` (0-based), ``elapsed`` training seconds in: a
    linear warm-up, then cosine decay over the epochs or the ``minutes`` budget, whichever
    ends first, floored at 1% of the peak."""
    planned = config.epochs * config.steps_per_epoch
    warmup = min(200, planned // 10 + 1)
    budget = config.minutes * 60.0 if config.minutes else None
    frac = max(elapsed / budget, step / planned) if budget else step / planned
    lr = config.learning_rate * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
    return max(lr, config.learning_rate * 0.01)


# -- the run ---------------------------------------------------------------------------------
LOSS_NAMES = ("total", "supcon", "cosface", "recon", "distill", "anchor")
"""The train step's loss terms, in its order (distill is 0 without a teacher, anchor without
``anchor_weight``)."""


@dataclass
class _Fit:
    """What the epochs loop leaves: per-epoch records, the kept epoch and the clock."""

    history: list[dict]
    best_epoch: int
    best_path: Path
    steps: int
    train_wall: float
    eval_seconds: float


def _fit(config: TrainConfig, nets: _Networks, train_step, sample_batch, evaluate, average,
         out: Path, log, distilling: bool, recalibrate=None) -> _Fit:
    """Run the epochs: steps with the scheduled rate, then a validation of the weight
    average (its BatchNorm statistics recomputed by ``recalibrate`` when they leave every
    image with nearly one latent, :func:`collapsed`), its checkpoints, and one log line per
    epoch."""
    import tensorflow as tf

    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    off = {"distill": not distilling, "anchor": config.anchor_weight <= 0}  # terms left out of the step
    used = [not off.get(name, False) for name in LOSS_NAMES]
    history: list[dict] = []
    best = {"eer": math.inf, "top1": -1.0, "epoch": 0}
    best_path = out / "checkpoints" / "best.weights.h5"
    step = 0
    t_train = time.perf_counter()
    t_eval_total = 0.0
    stop = False
    for epoch in range(1, config.epochs + 1):
        sums = np.zeros(len(LOSS_NAMES))
        n = 0
        bar = tqdm(total=config.steps_per_epoch, desc=f"epoch {epoch}", disable=not config.progress,
                   leave=False, file=sys.stderr) if tqdm else None
        t_epoch = time.perf_counter()
        for _ in range(config.steps_per_epoch):
            lr = scheduled_learning_rate(config, step, time.perf_counter() - t_train - t_eval_total)
            nets.set_learning_rate(lr, config.backbone_lr_scale)
            losses = [float(v) for v in train_step(*(tf.constant(a) for a in sample_batch()))]
            if not np.isfinite(losses[0]):
                raise TrainingDivergedError(f"training diverged: the loss became {losses[0]} at step {step}; "
                                            "lower --lr")
            sums += losses
            n += 1
            step += 1
            if bar:
                bar.update(1)
                bar.set_postfix(loss=f"{losses[0]:.3f}", lr=f"{lr:.1e}")
            # the schedule ends with whichever comes first, the budget or the epochs
            if config.minutes and time.perf_counter() - t_train - t_eval_total >= config.minutes * 60.0:
                stop = True
                break
        if bar:
            bar.close()
        train_seconds = time.perf_counter() - t_epoch
        t_eval = time.perf_counter()
        with average.applied():
            metrics = evaluate()
            if recalibrate is not None and collapsed(metrics):
                # stale moving statistics: recompute them for the weights validated (the raw
                # weights and statistics come back after the block) and validate again
                recalibrate()
                metrics = {**evaluate(), "batchnorm_recomputed": True}
            seen = metrics["seen"]
            if config.stop_epoch:  # keep the epoch the run stops at (or the budget ends in)
                better = stop or epoch == config.stop_epoch
            else:  # keep the best one on trained products
                better = seen["eer"] < best["eer"] or (seen["eer"] == best["eer"] and seen["top1"] > best["top1"])
            if better:
                best = {"eer": seen["eer"], "top1": seen["top1"], "epoch": epoch}
                nets.autoencoder.save_weights(best_path)
            if config.keep_epochs:
                nets.encoder.save(out / "checkpoints" / f"encoder_epoch_{epoch:03d}.keras")
        nets.autoencoder.save_weights(out / "checkpoints" / "last.weights.h5")
        t_eval_total += time.perf_counter() - t_eval
        mean = sums / max(n, 1)
        history.append({
            "epoch": epoch, "steps": step, "train_seconds": round(train_seconds, 2), "lr": float(lr),
            "loss": {name: value for name, value, on in zip(LOSS_NAMES, mean, used) if on},
            "val": metrics,
        })
        unseen = metrics.get("unseen")
        log(f"epoch {epoch} step {step}: loss {mean[0]:.3f} (supcon {mean[1]:.3f} cos {mean[2]:.3f} "
            f"recon {mean[3]:.3f}"
            + "".join(f" {name} {mean[i]:.3f}" for i, name in enumerate(LOSS_NAMES) if name in off and used[i])
            + f") | val seen EER {seen['eer']:.3f} top1 {seen['top1']:.3f}"
            + (f" | unseen EER {unseen['eer']:.3f} top1 {unseen['top1']:.3f}" if unseen and unseen.get('n') else "")
            + (" *" if better else "")
            + (" (BatchNorm statistics recomputed: the moving ones gave every image one latent)"
               if metrics.get("batchnorm_recomputed") else ""))
        if stop or epoch == config.stop_epoch:
            break
    return _Fit(history, best["epoch"], best_path, step, time.perf_counter() - t_train, t_eval_total)


def train(config: TrainConfig) -> TrainResult:
    """Train an encoder as ``config`` says and write its outputs to ``config.out_dir``."""
    _check_config(config)
    t_start = time.perf_counter()
    _configure_tf(config)  # a missing [train] extra is named before anything is written
    out = Path(config.out_dir)
    made_folder = not out.exists()
    earlier = earlier_run_files(out, overwrite=config.overwrite)
    from auditlens.training.augment import (
        AugmentSwitches,
        CaptureAugmenter,
        pseudo_variants,
        save_augment_grid,
    )
    from auditlens.training.averaging import WeightAverage
    from auditlens.training.model import ModelSpec
    from auditlens.training.preview import save_latent_preview

    spec = PreprocessSpec(input_size=config.input_size, crop=config.crop)
    data_seed = config.seed if config.data_seed is None else config.data_seed
    rng = np.random.default_rng(data_seed)
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if config.progress else (lambda msg: None)

    backbone_state = _read_backbone(config, log)
    data = load_training_data(config, spec, log)
    teacher_targets = _teacher_targets(config, data, log)
    teacher = teacher_targets[0] if teacher_targets is not None else None
    backgrounds = data.photo_images if len(data.photo_images) else data.originals_big
    augmenter = CaptureAugmenter(config.input_size, backgrounds, AugmentSwitches.from_config(config),
                                 seed=data_seed)
    val = load_validation(config, data, spec, backgrounds, log)
    t_data = time.perf_counter() - t_start
    kept = clear_run_folder(out, earlier)  # only now: every input has loaded
    try:
        mspec = ModelSpec(
            input_size=config.input_size, latent_dim=config.latent_dim, width=config.width,
            head_channels=config.head_channels, recon_size=config.recon_size,
            backbone=config.backbone, trunk_blocks=config.trunk_blocks, pooling=config.pooling,
        )
        variants = pseudo_variants(config.pseudo_products)
        n_classes = len(data.train_ids) * len(variants)
        nets = _build_networks(config, mspec, backbone_state, n_classes, teacher.dim if teacher else None)
        # Validation, checkpoints and the shipped encoder use the weights' moving average.
        average = WeightAverage(nets.encoder.weights, config.ema_decay)
        images_with = _batch_images(data, variants)
        train_step = _make_train_step(config, nets, data, images_with(augmenter), variants, teacher_targets,
                                      average)
        evaluate = _evaluator(config, nets.encoder, data, val)
        sample_batch = _batch_sampler(config, data, rng)

        preview = rng.choice(len(data.train_ids), size=min(6, len(data.train_ids)), replace=False)
        save_augment_grid(
            augmenter, data.originals_big[preview], data.masks[preview], out / "augment_grid.png",
            clean=data.originals_clean[preview],
            photos=data.photo_images[: 16] if len(data.photo_images) else None,
        )
        log(f"training on {len(data.train_ids)} products ({len(data.held_out)} held out)"
            + (f" x {len(variants)} variants" + (f" ({', '.join(config.pseudo_kinds)} only)" if config.pseudo_kinds else "")
               if len(variants) > 1 else "") + f", {len(data.photos)} photos; "
            f"budget {f'{config.minutes:.1f} min' if config.minutes else f'{config.epochs} epochs'}")
        fit = _fit(config, nets, train_step, sample_batch, evaluate, average, out, log, teacher is not None,
                   _recalibrator(config, nets.encoder, data, images_with, backgrounds, data_seed))

        # ---- outputs: the best encoder, alone and with its decoder
        nets.autoencoder.load_weights(fit.best_path)
        encoder_path = out / "encoder.keras"
        autoencoder_path = out / "autoencoder.keras"
        nets.encoder.save(encoder_path)
        nets.autoencoder.save(autoencoder_path)
        final = evaluate()
        seconds = time.perf_counter() - t_start
        report = {
            "config": config.to_dict(),
            "model": asdict(mspec),
            "preprocess": spec.to_dict(),
            "encoder_params": int(nets.encoder.count_params()),
            "data": {
                "products": len(data.ids), "train_products": len(data.train_ids),
                "held_out_products": sorted(data.held_out), "train_photos": len(data.photos),
                "train_classes": n_classes,
                "val_queries": int(len(val.labels)), "val_views": val.views, "val_source": val.source,
                "val_seen": int(val.seen.sum()), "val_unseen": int((~val.seen).sum()),
                "val_photos_also_trained": val.also_trained,
                "teacher": ({"features": teacher.source, "dim": teacher.dim} if teacher is not None else None),
            },
            "timings": {
                "total_seconds": round(seconds, 1), "data_seconds": round(t_data, 1),
                "train_loop_seconds": round(fit.train_wall, 1), "eval_seconds": round(fit.eval_seconds, 1),
                "steps": fit.steps,
                "seconds_per_step": round((fit.train_wall - fit.eval_seconds) / max(fit.steps, 1), 4),
            },
            "best_epoch": fit.best_epoch,
            "checkpoint_choice": ("last epoch run (--stop-epoch)" if config.stop_epoch
                                  else "lowest val EER on trained products"),
            "metrics": final,
            "history": fit.history,
        }
        report_path = out / "report.json"
        report_path.write_text(json.dumps(report, indent=2, default=float))
        plot_curves(fit.history, out / "training_curves.png")
        save_latent_preview(nets.encoder, nets.decoder, preview_samples(data, val, preview),
                            out / "latent_preview.png")
        # said again at the end, where --quiet still shows them
        warnings = [*data.catalog.notes, *filter(None, [_random_trunk_note(config), data.photoless_note])]
        if val.also_trained:
            warnings.append(overlap_warning(val.also_trained, len(val.labels)))
        if kept is not None:  # the new run is whole: the earlier one it replaces goes
            shutil.rmtree(kept, ignore_errors=True)
        return TrainResult(str(out), str(encoder_path), str(autoencoder_path), str(report_path),
                           fit.best_epoch, final, seconds, warnings)
    except BaseException:  # an error, or Ctrl-C, before the first checkpoint
        discard_unfinished_run(out, made_folder=made_folder, kept=kept)
        raise


def preview_samples(data: TrainingData, val: ValidationSet, originals: np.ndarray) -> np.ndarray:
    """The inputs ``latent_preview.png`` shows: up to four of the ``originals`` (indices
    into the trained products), then up to six validation queries' first views (the plain
    view training validates on, not the device's photo zoom), evenly spread: up to three
    of trained and up to three of held-out products (up to six when only one kind has any)."""
    first_views = val.images[:: val.views]
    groups = [np.flatnonzero(val.seen), np.flatnonzero(~val.seen)]
    groups = [g for g in groups if len(g)]
    picked = [g[np.linspace(0, len(g) - 1, min(len(g), 6 // len(groups))).astype(int)] for g in groups]
    return np.concatenate([data.originals_clean[originals[:4]], *(first_views[p] for p in picked)])


def plot_curves(history: list[dict], path: Path) -> Path | None:
    """Loss terms and validation EER/top-1 per epoch (skipped if matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - eval extra not installed
        return None
    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for key in LOSS_NAMES:
        if all(key in h["loss"] for h in history):
            ax1.plot(epochs, [h["loss"][key] for h in history], marker=".", label=key)  # one epoch: a dot
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("training loss")
    ax1.set_yscale("log")
    ax1.legend()
    held_out = all("unseen" in h["val"] for h in history)
    for subset, style in (("seen", "-"), ("unseen", "--")):
        if all(subset in h["val"] and h["val"][subset].get("n") for h in history):
            name = f"val {subset}" if held_out else "val"
            ax2.plot(epochs, [h["val"][subset]["eer"] for h in history], "C0." + style, label=f"EER {name}")
            ax2.plot(epochs, [h["val"][subset]["top1"] for h in history], "C1." + style, label=f"top-1 {name}")
    ax2.set_xlabel("epoch")
    ax2.set_ylim(0, 1)
    ax2.legend()
    ax2.grid(alpha=0.3)
    from matplotlib.ticker import MaxNLocator

    for ax in (ax1, ax2):  # whole epochs: a two-epoch run's axis read 1.2, 1.4, ...
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# -- CLI -------------------------------------------------------------------------------------
def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``auditlens train``."""
    d = TrainConfig()
    parser.description = (
        "Train the image encoder on a catalogue of originals, optionally with labelled field "
        "photos. Writes encoder.keras, autoencoder.keras, report.json, augment_grid.png, "
        "training_curves.png, latent_preview.png and checkpoints/ (the best and last weights, "
        "and with --keep-epochs each epoch's encoder) to --out; export the encoder with "
        "'auditlens export'."
    )
    parser.add_argument("catalog", help="catalogue of originals: folder of images, CSV or sqlite:///db")
    parser.add_argument("--photos", help="photo,product_id CSV of labelled field photos to train on")
    parser.add_argument("--val-photos", help="photo,product_id CSV to validate on "
                        "(default: fixed augmented originals)")
    parser.add_argument("--out", required=True, help="output folder (a folder holding an earlier run "
                        "is refused unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the earlier run's files in --out (its model, report, checkpoints)")
    parser.add_argument("--minutes", type=float,
                        help="wall-clock training budget: training stops after it or after --epochs, "
                             "whichever comes first, and the learning rate decays towards that end")
    parser.add_argument("--epochs", type=int, default=d.epochs, help=f"maximum epochs (default {d.epochs})")
    parser.add_argument("--stop-epoch", type=int, metavar="N",
                        help="stop after epoch N of the --epochs schedule and keep that epoch's "
                        "encoder, not the best on trained products: for catalogues whose products "
                        "are mostly enrolled after training (e.g. --epochs 25 --stop-epoch 10)")
    parser.add_argument("--steps-per-epoch", type=int, default=d.steps_per_epoch,
                        help=f"steps between validations (default {d.steps_per_epoch})")
    parser.add_argument("--holdout-fold", metavar="k/K",
                        help="hold out fold k of K (deterministic by product id) to measure unseen products")
    parser.add_argument("--seed", type=int, default=d.seed, help=f"random seed (default {d.seed})")
    parser.add_argument("--data-seed", type=int, default=d.data_seed,
                        help="seed of the batches and augmentation alone (default: --seed); runs "
                             "with one --seed and other data seeds start from the same weights, "
                             "so 'auditlens soup' can average them")
    parser.add_argument("--input-size", type=int, default=d.input_size, help=f"encoder input side (default {d.input_size})")
    parser.add_argument("--latent-dim", type=int, default=d.latent_dim, help=f"latent length (default {d.latent_dim})")
    parser.add_argument("--width", type=int, default=d.width, help=f"encoder stem channels (default {d.width})")
    parser.add_argument("--backbone", choices=BACKBONES, default=d.backbone,
                        help="encoder body: the small network trained from scratch, or the first "
                        f"--trunk-blocks blocks of MobileNetV2 (default {d.backbone})")
    parser.add_argument("--backbone-weights", metavar="PTH",
                        help="torchvision's ImageNet MobileNetV2 state dict (mobilenet_v2-b0353104.pth, "
                        "read without torch; never downloaded) to start the mobilenet_v2 trunk from")
    parser.add_argument("--trunk-blocks", type=int, default=d.trunk_blocks, metavar="N",
                        help=f"MobileNetV2 blocks kept, 1-17 (default {d.trunk_blocks}: up to the 96-channel stage)")
    parser.add_argument("--pooling", choices=POOLINGS, default=d.pooling,
                        help="global pooling of the encoder's last feature map: average, average "
                        "and maximum side by side, or an average weighted by a learnt map of where "
                        f"the product is (default {d.pooling}; avgmax measured on three folds: better "
                        "on new cartons, level overall, see docs/ablation.md)")
    parser.add_argument("--backbone-lr-scale", type=float, default=d.backbone_lr_scale,
                        help="learning rate of the pretrained trunk relative to --lr "
                        f"(default {d.backbone_lr_scale})")
    parser.add_argument("--freeze-blocks", type=int, default=d.freeze_blocks, metavar="N",
                        help="keep the pretrained trunk's stem and first N blocks as ImageNet left "
                        f"them and fine-tune the rest (default {d.freeze_blocks}: none; 6 measured "
                        "on one fold: worse on new and trained products, see docs/ablation.md)")
    parser.add_argument("--freeze-late", type=int, default=d.freeze_late, metavar="N",
                        help="keep the pretrained trunk's last N blocks as ImageNet left them and "
                        f"fine-tune the stem and the blocks before (default {d.freeze_late}: none; 7 "
                        "measured on three folds: new packaged products identified better on two, "
                        "trained products worse on all, see docs/ablation.md)")
    parser.add_argument("--products-per-batch", type=int, default=d.products_per_batch,
                        help=f"products per batch (default {d.products_per_batch})")
    parser.add_argument("--views-per-product", type=int, default=d.views_per_product,
                        help=f"views per product per batch (default {d.views_per_product})")
    parser.add_argument("--group-pairs", type=float, default=d.group_pairs,
                        help="share of a batch's products drawn as same-group pairs, the hard "
                        f"negatives (default {d.group_pairs}; 0: uniform)")
    parser.add_argument("--pseudo-products", type=int, default=d.pseudo_products, metavar="N",
                        choices=range(12),
                        help="made-up products per trained product (0-11): its colour channels "
                        "swapped and/or upside down, each its own class "
                        f"(default {d.pseudo_products})")
    parser.add_argument("--pseudo-kinds", nargs="+", default=list(d.pseudo_kinds), metavar="KIND",
                        help="only products of these catalogue kinds get made-up variants, "
                        "e.g. Packages (default: every product)")
    parser.add_argument("--lr", type=float, default=d.learning_rate, help=f"peak learning rate (default {d.learning_rate})")
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay,
                        help=f"AdamW decoupled weight decay (default {d.weight_decay})")
    for field, what, note in (  # the losses' settings: --metric-weight ... --arcface-margin
            ("metric_weight", "supervised contrastive loss weight", "; 0 disables"),
            ("class_weight", "CosFace loss weight", "; 0 disables"),
            ("recon_weight", "reconstruction loss weight", "; 0 disables"),
            ("temperature", "supervised contrastive temperature", ""),
            ("cosface_scale", "scale of the CosFace (or ArcFace) logits", ""),
            ("cosface_margin", "CosFace margin subtracted from the true product's cosine", ""),
            ("anchor_weight", "weight of the original-anchored loss (each view and photo among the "
             "batch's clean originals, CosFace scale and margin)",
             "; 0 disables; measured to lower EER and cost top-1, docs/ablation.md"),
            ("arcface_margin", "ArcFace margin in radians added to the true product's angle",
             "; above 0 replaces the CosFace margin, e.g. 0.3")):
        default = getattr(d, field)
        parser.add_argument("--" + field.replace("_", "-"), type=float, default=default,
                            help=f"{what} (default {default}{note})")
    parser.add_argument("--teacher-features", metavar="NPZ",
                        help="a pretrained model's features of every training image (auditlens "
                        "teacher-features) to distil into the latent")
    parser.add_argument("--distill-weight", type=float, default=d.distill_weight,
                        help=f"distillation loss weight, with --teacher-features (default {d.distill_weight})")
    parser.add_argument("--no-augment", action="store_true", help="no augmentation at all")
    parser.add_argument("--no-paste-background", action="store_true",
                        help="keep originals on white instead of pasting them onto photo crops")
    parser.add_argument("--no-mirror", action="store_true",
                        help="never flip augmented views left-right")
    parser.add_argument("--ema-decay", type=float, default=d.ema_decay,
                        help="per-step decay of the weight moving average that is validated and "
                        f"shipped (default {d.ema_decay}; 0: raw weights)")
    parser.add_argument("--bn-batches", type=int, default=d.bn_batches, metavar="N",
                        help="when the validated encoder gives every image nearly the same latent (a "
                        "short run: its BatchNorm moving statistics still hold their early values), "
                        "recompute them from N training batches for the encoder kept and shipped "
                        f"(default {d.bn_batches}; 0: never)")
    parser.add_argument("--keep-epochs", action="store_true",
                        help="also save the encoder of every epoch (checkpoints/encoder_epoch_NNN.keras), "
                        "to export a checkpoint other than the best one on seen products")
    parser.add_argument("--threads", type=int, default=d.threads,
                        help="TensorFlow threads (default: all cores; use 1 when runs share a machine)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or log lines")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        catalog=str(args.catalog), photos=args.photos, val_photos=args.val_photos, out_dir=args.out,
        minutes=args.minutes, epochs=args.epochs, stop_epoch=args.stop_epoch, steps_per_epoch=args.steps_per_epoch,
        holdout_fold=args.holdout_fold, seed=args.seed, data_seed=args.data_seed, input_size=args.input_size,
        latent_dim=args.latent_dim, width=args.width, backbone=args.backbone,
        backbone_weights=args.backbone_weights, trunk_blocks=args.trunk_blocks, pooling=args.pooling,
        backbone_lr_scale=args.backbone_lr_scale, freeze_blocks=args.freeze_blocks, freeze_late=args.freeze_late,
        products_per_batch=args.products_per_batch,
        views_per_product=args.views_per_product, group_pairs=args.group_pairs,
        pseudo_products=args.pseudo_products, pseudo_kinds=tuple(args.pseudo_kinds),
        learning_rate=args.lr,
        weight_decay=args.weight_decay, metric_weight=args.metric_weight, class_weight=args.class_weight,
        recon_weight=args.recon_weight, temperature=args.temperature, cosface_scale=args.cosface_scale,
        cosface_margin=args.cosface_margin, anchor_weight=args.anchor_weight, arcface_margin=args.arcface_margin,
        teacher_features=args.teacher_features,
        distill_weight=args.distill_weight, augment=not args.no_augment,
        paste_background=not args.no_paste_background, mirror=not args.no_mirror,
        ema_decay=args.ema_decay, bn_batches=args.bn_batches, keep_epochs=args.keep_epochs, threads=args.threads,
        progress=not args.quiet, overwrite=args.overwrite,
    )


def run_train(args: argparse.Namespace) -> int:
    """``auditlens train``: returns the process exit code."""
    try:
        config = config_from_args(args)
        if config.holdout_fold:
            parse_fold(config.holdout_fold)
        result = train(config)
    except (AuditlensError, ValueError) as exc:
        print(f"auditlens: error: {exc}", file=sys.stderr)
        return 2
    m = result.metrics
    chosen = "stopped at epoch" if config.stop_epoch else "best epoch"
    print(f"encoder: {result.encoder_path} ({chosen} {result.best_epoch}, {result.seconds / 60:.1f} min)")
    for subset in ("seen", "unseen"):
        s = m.get(subset)
        if s and s.get("n") and (subset == "seen" or "unseen" in m):
            print(f"val {subset:6s}: n={s['n']} top1={s['top1']:.3f} EER={s['eer']:.3f} AUC={s['auc']:.3f}")
    print(f"report: {result.report_path}")
    for warning in filter(None, [collapse_warning(m, config.bn_batches), *result.warnings]):
        print(f"auditlens: warning: {warning}", file=sys.stderr)
    return 0


def collapsed(metrics: dict) -> bool:
    """Whether validation photos score about as high against other products' originals as
    a copy would (the encoder gives every image nearly the same latent)."""
    from auditlens.evaluation.metrics import COLLAPSED_SCORE

    seen = metrics.get("seen") or {}
    return bool(seen.get("n")) and seen.get("impostor_mean", 0.0) >= COLLAPSED_SCORE


def collapse_warning(metrics: dict, bn_batches: int | None = None) -> str | None:
    """What to tell an engineer whose encoder gives every validation photo and original
    nearly the same latent, or scores its trained products' validation photos near chance
    (AUC below :data:`COLLAPSED_AUC`), else None. ``bn_batches``: the run's
    ``--bn-batches`` when known; at 0 the BatchNorm statistics, the usual cause, were never
    recomputed."""
    seen = metrics.get("seen") or {}
    if not seen.get("n"):
        return None
    if collapsed(metrics):
        fix = (f"Train again with --bn-batches {TrainConfig().bn_batches} (this run recomputed no "
               "BatchNorm statistics, which a short run leaves at their early values), or longer "
               "(--epochs, --steps-per-epoch)"
               if bn_batches == 0 else "Train longer (--epochs, --steps-per-epoch)")
        return (f"the encoder gives every image nearly the same latent (validation photos score "
                f"{seen['impostor_mean']:.4f} on average against the other products' originals, a trained "
                f"model about 0): any photo would MATCH any product. {fix}; enroll refuses such a model")
    if seen.get("auc", 1.0) >= COLLAPSED_AUC:
        return None
    return (f"the encoder does not tell the validation products apart (AUC {seen['auc']:.2f}, 0.5 is "
            "chance): train longer (--epochs, --steps-per-epoch) or check the photos' labels before "
            "exporting it")


def main(argv: list[str] | None = None) -> int:
    parser = add_train_arguments(argparse.ArgumentParser(prog="auditlens train"))
    return run_train(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
