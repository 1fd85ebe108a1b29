"""Training: augmentation, losses, folds and metrics (fast), and tiny end-to-end runs (slow).

The end-to-end runs train a very small encoder for a few steps on generated products
(coloured shapes on white, written as PNGs into a folder catalogue) and check that every
output of a run is written and readable; they do not expect the model to be good.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from tests.conftest import product_image, write_csv

tf = pytest.importorskip("tensorflow")

N_PRODUCTS = 6


def tiny_config(out: Path, catalog: Path, **overrides):
    from auditlens.training.config import TrainConfig

    values = dict(
        catalog=str(catalog), out_dir=str(out), input_size=32, latent_dim=16, width=8,
        head_channels=32, recon_size=16, epochs=2, steps_per_epoch=3, products_per_batch=4,
        views_per_product=3, progress=False, seed=1,
    )
    values.update(overrides)
    return TrainConfig(**values)


def field_photo(seed: int, variant: int) -> Image.Image:
    """A 'field photo' of product ``seed``: shifted, on a grey-ish background, blurred."""
    rng = np.random.default_rng(1000 * seed + variant)
    bg = tuple(int(c) for c in rng.integers(60, 200, 3))
    canvas = Image.new("RGB", (200, 180), bg)
    canvas.paste(product_image(seed, 140), (int(rng.integers(0, 60)), int(rng.integers(0, 40))))
    return canvas.filter(ImageFilter.GaussianBlur(1))


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    originals = root / "originals"
    photos = root / "photos"
    originals.mkdir()
    photos.mkdir()
    train_rows, val_rows = [], []
    for i in range(N_PRODUCTS):
        product_image(i, 96).save(originals / f"product-{i}.png")
        for v in range(3):
            name = f"p{i}_{v}.jpg"
            field_photo(i, v).save(photos / name, quality=90)
            (val_rows if v == 2 else train_rows).append([f"photos/{name}", f"product-{i}"])
    return {
        "catalog": originals,
        "train": write_csv(root / "train.csv", ["photo", "product_id"], train_rows),
        "val": write_csv(root / "val.csv", ["photo", "product_id"], val_rows),
        "root": root,
    }


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    from auditlens.training.train import train

    out = tmp_path_factory.mktemp("run")
    config = tiny_config(out, tiny_data["catalog"], photos=str(tiny_data["train"]),
                         val_photos=str(tiny_data["val"]), holdout_fold="1/3", keep_epochs=True)
    return train(config)


# -- fast ------------------------------------------------------------------------------------
def test_object_mask_keeps_white_inside_the_product():
    from auditlens.training.augment import object_mask

    img = np.full((40, 40, 3), 255, np.uint8)
    img[10:30, 10:30] = (200, 30, 30)  # a red carton ...
    img[15:25, 15:25] = 255  # ... with a white label inside
    mask = object_mask(img)
    assert mask[20, 20] == 255, "white inside the product must stay product"
    assert mask[2, 2] == 0 and mask[12, 12] == 255


def test_augmenter_shapes_range_and_background_pasting():
    from auditlens.training.augment import AugmentSwitches, CaptureAugmenter, object_mask

    original = np.asarray(product_image(3, 48))
    masks = object_mask(original)[None, ..., None]
    backgrounds = np.zeros((2, 48, 48, 3), np.uint8)  # black clutter: easy to detect
    only_paste = AugmentSwitches(True, False, False, False, False, False, False, False)
    aug = CaptureAugmenter(32, backgrounds, only_paste, seed=0)
    out = aug.originals(tf.constant(np.repeat(original[None], 16, 0)), tf.constant(np.repeat(masks, 16, 0)))
    out = out.numpy()
    assert out.shape == (16, 32, 32, 3) and out.min() >= 0 and out.max() <= 255
    corners = out[:, :3, :3].reshape(16, -1).mean(1)
    assert (corners < 30).mean() > 0.5, "most views should have the white studio corner replaced"
    full = CaptureAugmenter(32, backgrounds, AugmentSwitches(), seed=0)
    photos = full.photos(tf.constant(np.repeat(original[None], 4, 0))).numpy()
    assert photos.shape == (4, 32, 32, 3) and np.all(photos == np.round(photos))


def test_photo_crops_and_pasted_backgrounds_never_reach_past_the_frame():
    # A crop running off a field photo or a background is filled with studio white, the
    # cue that tells an original from a photo: black inputs must stay black throughout.
    from auditlens.training.augment import AugmentSwitches, CaptureAugmenter, object_mask

    black = tf.zeros((256, 48, 48, 3), tf.uint8)
    only_geometry = AugmentSwitches(False, True, False, False, False, False, False, False)
    photos = CaptureAugmenter(32, None, only_geometry, seed=1).photos(black).numpy()
    assert photos.max() == 0, f"{(photos.max(axis=(1, 2, 3)) > 0).mean():.0%} of photo views hold white fill"
    original = np.asarray(product_image(3, 48))
    masks = np.repeat(object_mask(original)[None, ..., None], 256, 0)
    only_paste = AugmentSwitches(True, False, False, False, False, False, False, False)
    pasted = CaptureAugmenter(32, np.zeros((2, 48, 48, 3), np.uint8), only_paste, seed=1).originals(
        tf.constant(np.repeat(original[None], 256, 0)), tf.constant(masks)).numpy()
    corners = pasted[:, :2, :2].reshape(256, -1)
    pasted_views = corners.mean(1) < 128  # the ~85% whose white studio corner was replaced
    assert pasted_views.mean() > 0.7 and corners[pasted_views].max() == 0


def test_defocus_blur_leaves_a_flat_image_flat_up_to_its_edges():
    # Zero padding would average black into a 3-6 px frame (a flat 200 fell to 56 in the
    # corners), a mark no real capture carries; the blur reflects the edges instead.
    from auditlens.training.augment import AugmentSwitches, CaptureAugmenter

    flat = tf.fill((64, 32, 32, 3), tf.constant(200, tf.uint8))
    only_blur = AugmentSwitches(False, False, False, True, False, False, False, False)
    out = CaptureAugmenter(32, None, only_blur, seed=2).photos(flat).numpy()
    assert np.abs(out - 200).max() <= 1, f"edge pixels fell to {out.min():.0f}"


def test_an_empty_batch_of_photos_augments_to_an_empty_batch():
    # Training from originals alone hands the photo augmenter no photos. On some CPUs
    # TensorFlow's depthwise convolution returns an empty batch at its padded size, which
    # the blur's mix could not add to its input; every family must pass it through, in a
    # traced step as in eager code, and a batch of photos after it is still augmented.
    from auditlens.training.augment import AugmentSwitches, CaptureAugmenter

    empty = tf.zeros((0, 40, 40, 3), tf.uint8)
    batch = tf.fill((4, 40, 40, 3), tf.constant(120, tf.uint8))
    aug = CaptureAugmenter(32, None, AugmentSwitches(), seed=4)
    assert aug.photos(empty).shape == (0, 32, 32, 3)
    assert tf.function(aug.photos)(empty).shape == (0, 32, 32, 3)
    out = aug.photos(batch).numpy()
    assert out.shape == (4, 32, 32, 3) and np.ptp(out) > 0  # a flat grey, changed by the capture


def test_mirroring_flips_about_half_the_views_and_nothing_else():
    from auditlens.training.augment import AugmentSwitches, CaptureAugmenter

    # A left-to-right ramp: its mirror image is unmistakable.
    ramp = np.tile(np.linspace(0, 255, 32, dtype=np.float32)[None, :, None], (32, 1, 3))
    batch = tf.constant(np.repeat(ramp[None], 64, 0).astype(np.uint8))
    only_mirror = AugmentSwitches(False, False, False, False, False, False, False, True)
    out = CaptureAugmenter(32, None, only_mirror, seed=3).photos(batch).numpy()
    plain = np.round(tf.image.resize(tf.cast(batch[:1], tf.float32), [32, 32], antialias=True).numpy()[0])
    is_plain = np.all(np.abs(out - plain) <= 1, axis=(1, 2, 3))
    is_mirror = np.all(np.abs(out - plain[:, ::-1]) <= 1, axis=(1, 2, 3))
    assert np.all(is_plain ^ is_mirror), "every view is the image or its mirror image"
    assert 16 <= is_mirror.sum() <= 48
    never = AugmentSwitches(False, False, False, False, False, False, False, False)
    out = CaptureAugmenter(32, None, never, seed=3).photos(batch).numpy()
    assert np.all(np.abs(out - plain) <= 1)


def test_weight_average_follows_the_weights_and_swaps_back():
    from auditlens.training.averaging import WeightAverage

    w = tf.Variable([0.0, 2.0])
    average = WeightAverage([w], decay=0.9)
    w.assign([1.0, 2.0])
    average.update()  # first update: decay min(0.9, 2/11), mostly the new weights
    d = 2 / 11
    np.testing.assert_allclose(average.values()[0], [d * 0.0 + (1 - d) * 1.0, 2.0], rtol=1e-6)
    for _ in range(300):
        average.update()
    np.testing.assert_allclose(average.values()[0], [1.0, 2.0], atol=1e-4)
    w.assign([5.0, 5.0])
    average.update()  # settled: decay 0.9
    expected = [0.9 * 1.0 + 0.1 * 5.0, 0.9 * 2.0 + 0.1 * 5.0]
    np.testing.assert_allclose(average.values()[0], expected, atol=1e-4)
    with pytest.raises(RuntimeError), average.applied():
        np.testing.assert_allclose(w.numpy(), expected, atol=1e-4)
        raise RuntimeError("validation crashed")
    np.testing.assert_array_equal(w.numpy(), [5.0, 5.0])  # raw weights back after a crash

    off = WeightAverage([w], decay=0.0)
    off.update()
    with off.applied():
        np.testing.assert_array_equal(w.numpy(), [5.0, 5.0])
    with pytest.raises(ValueError):
        WeightAverage([w], decay=1.0)


def test_batchnorm_statistics_are_recomputed_as_the_plain_mean_over_the_batches():
    """The moving statistics become the equal-weight mean of the batches' statistics (the
    layer's own momentum is put back after); a frozen BatchNorm layer keeps its own."""
    import keras

    from auditlens.training.averaging import batchnorm_layers, recalibrate_batchnorm

    inputs = keras.Input((3,))
    frozen = keras.layers.BatchNormalization(name="frozen")
    frozen.trainable = False
    live = keras.layers.BatchNormalization(momentum=0.99, name="live")
    model = keras.Model(inputs, live(keras.layers.Dense(3, name="dense")(frozen(inputs))))
    outer_in = keras.Input((3,))
    inner = keras.Model(outer_in, model(outer_in))  # nested, as the trunk is
    assert batchnorm_layers(inner) == [live]
    rng = np.random.default_rng(0)
    batches = [rng.normal(loc=i, scale=1 + i, size=(16, 3)).astype(np.float32) for i in range(4)]
    dense = model.get_layer("dense")
    hidden = [np.asarray(dense(frozen(b, training=False))) for b in batches]  # what reaches `live`
    assert recalibrate_batchnorm(inner, iter(batches)) == 4
    np.testing.assert_allclose(np.asarray(live.moving_mean), np.mean([h.mean(0) for h in hidden], 0), rtol=1e-4,
                               atol=1e-5)
    np.testing.assert_allclose(np.asarray(live.moving_variance), np.mean([h.var(0) for h in hidden], 0), rtol=1e-3)
    assert live.momentum == 0.99
    np.testing.assert_array_equal(np.asarray(frozen.moving_mean), np.zeros(3))
    with pytest.raises(ValueError, match="no batches"):
        recalibrate_batchnorm(inner, iter([]))


def test_supcon_prefers_clustered_latents():
    from auditlens.training.losses import cosface_loss, supcon_loss

    labels = tf.constant([0, 0, 1, 1, 2, 2])
    clustered = tf.constant(np.repeat(np.eye(3, 8), 2, axis=0), tf.float32)
    mixed = tf.constant(np.tile(np.eye(3, 8), (2, 1)), tf.float32)  # positives orthogonal
    assert float(supcon_loss(clustered, labels)) < float(supcon_loss(mixed, labels))
    # views of one original only (no labelled photos): still a finite, positive loss
    assert np.isfinite(float(supcon_loss(mixed, labels)))
    cos_right = tf.constant(np.repeat(np.eye(3), 2, axis=0), tf.float32)
    assert float(cosface_loss(cos_right, labels)) < float(cosface_loss(1 - cos_right, labels))


def test_arcface_loss_matches_hand_computed_values():
    """Row 1: true cosine 0.8, the margin added to its angle; row 2: true cosine -0.99, an
    angle within the margin of pi, where the loss takes the fallback logit instead."""
    from auditlens.training.losses import arcface_loss, cosface_loss

    def cross_entropy(logits, true):
        logits = np.asarray(logits, np.float64)
        return float(np.log(np.exp(logits).sum()) - logits[true])

    cosines = tf.constant([[0.8, 0.1, -0.2], [0.3, 0.95, -0.99]], tf.float32)
    labels = tf.constant([0, 2])
    s, m = 20.0, 0.3
    row1 = [s * math.cos(math.acos(0.8) + m), s * 0.1, s * -0.2]
    assert math.acos(-0.99) + m > math.pi
    row2 = [s * 0.3, s * 0.95, s * (-0.99 - m * math.sin(m))]
    expected = (cross_entropy(row1, 0) + cross_entropy(row2, 2)) / 2
    assert float(arcface_loss(cosines, labels, s, m)) == pytest.approx(expected, rel=1e-5)
    # a vanishing angular margin is CosFace without margin; a margin costs more on the same cosines
    assert float(arcface_loss(cosines, labels, s, 1e-9)) == pytest.approx(
        float(cosface_loss(cosines, labels, s, 0.0)), rel=1e-5)
    assert float(arcface_loss(cosines, labels, s, m)) > float(arcface_loss(cosines, labels, s, 0.1))
    # finite gradients at cosines of exactly 1 and -1 (sqrt(1 - cos^2) is clipped away from 0)
    edge = tf.Variable([[1.0, -1.0], [-1.0, 1.0]])
    with tf.GradientTape() as tape:
        loss = arcface_loss(edge, tf.constant([0, 0]), s, m)
    assert np.all(np.isfinite(tape.gradient(loss, edge).numpy()))


def test_original_anchor_loss_matches_hand_computed_values():
    """Two clean originals (labels 7 and 3) first, then three views: each view's cosines with
    the two originals, its own original's lowered by the margin, through a softmax."""
    from auditlens.training.losses import original_anchor_loss

    def unit(deg):
        return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]

    # originals at 0 and 90 degrees; views at 10 (of 7), 60 (of 3), 100 (of 7, the hard one)
    latents = tf.constant([unit(0), unit(90), unit(10), unit(60), unit(100)], tf.float32)
    latents = latents * tf.constant([[2.0], [0.5], [1.0], [3.0], [1.0]])  # norms do not matter
    labels = tf.constant([7, 3, 7, 3, 7])
    s, m = 20.0, 0.25

    def row(view, own):
        cosines = [math.cos(math.radians(view)), math.cos(math.radians(view - 90))]
        logits = np.array(cosines, np.float64) * s
        logits[own] -= s * m
        return float(np.log(np.exp(logits).sum()) - logits[own])

    expected = (row(10, 0) + row(60, 1) + row(100, 0)) / 3
    assert float(original_anchor_loss(latents, labels, 2, s, m)) == pytest.approx(expected, rel=1e-5)
    # views nearer their own original cost less than views nearer the other one
    swapped = tf.constant([7, 3, 3, 7, 3])
    assert float(original_anchor_loss(latents, labels, 2, s, m)) < float(
        original_anchor_loss(latents, swapped, 2, s, m))


def test_holdout_folds_partition_the_products():
    from auditlens.training.train import holdout_products, parse_fold

    ids = [f"p{i}" for i in range(31)]
    folds = [holdout_products(ids, f"{k}/3") for k in (1, 2, 3)]
    assert set().union(*folds) == set(ids) and sum(map(len, folds)) == len(ids)
    assert holdout_products(list(reversed(ids)), "2/3") == folds[1]  # order-independent
    with pytest.raises(ValueError):
        parse_fold("4/3")


def test_batches_pair_products_of_one_group():
    from auditlens.training.train import group_mates, sample_products

    # the grocery shape: a few large groups (milk, juice) and many products alone
    groups = ["milk"] * 7 + ["juice"] * 6 + ["pepper"] * 4 + [f"single{i}" for i in range(20)]
    mates = group_mates(groups)
    assert list(mates[0]) == [1, 2, 3, 4, 5, 6] and len(mates[20]) == 0

    def same_group_pairs(batch: np.ndarray) -> int:
        counts: dict[str, int] = {}
        for i in batch:
            counts[groups[i]] = counts.get(groups[i], 0) + 1
        return sum(c // 2 for c in counts.values())

    rng = np.random.default_rng(0)
    hard = [sample_products(rng, mates, 16, 0.5) for _ in range(200)]
    uniform = [sample_products(rng, mates, 16, 0.0) for _ in range(200)]
    for batch in hard + uniform:
        assert len(batch) == 16 and len(set(batch.tolist())) == 16
    assert min(same_group_pairs(b) for b in hard) >= 4  # 8 of 16 products come in pairs
    assert np.mean([same_group_pairs(b) for b in hard]) > np.mean([same_group_pairs(b) for b in uniform]) + 1
    # more pairs asked for than groups can give: the batch is still full and distinct
    small = sample_products(rng, group_mates(["a", "a", "b", "c"]), 8, 1.0)
    assert sorted(small.tolist()) == [0, 1, 2, 3]


def test_made_up_products_swap_colour_channels_and_turn_upside_down():
    from auditlens.training.augment import pseudo_variants, variant_images

    assert pseudo_variants(0) == [((0, 1, 2), False)]
    every = pseudo_variants(11)
    assert len(set(every)) == 12 and every[0] == ((0, 1, 2), False)
    assert [flip for _, flip in every] == [False] * 6 + [True] * 6
    with pytest.raises(ValueError):
        pseudo_variants(12)

    images = np.random.default_rng(0).uniform(0, 255, (len(every), 8, 6, 3)).astype(np.float32)
    out = variant_images(every)(tf.constant(images), tf.range(len(every))).numpy()
    for i, (perm, flip) in enumerate(every):
        want = images[i][..., list(perm)]
        np.testing.assert_array_equal(out[i], want[::-1, ::-1] if flip else want)
    np.testing.assert_array_equal(out[0], images[0])
    # the swap keeps every pixel's brightness: only which colour is where changes
    np.testing.assert_allclose(out.sum(-1)[1], images.sum(-1)[1], rtol=1e-6)


def test_made_up_variants_are_shared_within_a_group():
    from auditlens.training.train import sample_variants

    groups = ["milk", "milk", "juice", "juice", "apple", "pear"]
    rng = np.random.default_rng(0)
    chosen = np.arange(6)
    draws = np.stack([sample_variants(rng, groups, chosen, 11) for _ in range(400)])
    assert (draws[:, 0] == draws[:, 1]).all() and (draws[:, 2] == draws[:, 3]).all()
    assert 0.4 < (draws == 0).mean() < 0.6  # about half the groups are the real products
    assert set(np.unique(draws)) == set(range(12))
    assert not sample_variants(rng, groups, chosen, 0).any()

    # only eligible products (say, the cartons) are ever made up; the others stay real
    eligible = np.array([True, True, True, True, False, False])
    draws = np.stack([sample_variants(rng, groups, chosen, 11, eligible=eligible) for _ in range(400)])
    assert not draws[:, 4:].any() and draws[:, :4].any()
    assert (draws[:, 0] == draws[:, 1]).all()


def test_the_attention_panel_keeps_the_most_weighted_pixels_and_a_fifth_of_the_least():
    from auditlens.training.preview import light_by

    image = np.full((32, 32, 3), 200, np.uint8)
    weights = np.zeros((2, 2), np.float32)
    weights[0, 0] = 0.5  # relative to the largest weight: 0.5 lights fully
    lit = light_by(image, weights)
    assert lit.shape == image.shape and lit.dtype == np.uint8
    assert lit[0, 0].tolist() == [200, 200, 200]  # the most weighted corner
    assert lit[-1, -1].tolist() == [40, 40, 40]  # a fifth where the weight is 0
    assert (lit <= image).all() and (lit >= 40).all()
    assert lit[0, 0, 0] > lit[8, 8, 0] > lit[-1, -1, 0]  # fades in between


@pytest.mark.parametrize("trained, seen, unseen, views, shown", [
    (6, 5, 4, 1, [0, 2, 4, 5, 6, 8]),  # 3 of trained products' photos, 3 of held-out ones'
    (6, 5, 1, 2, [0, 2, 4, 5]),  # one held-out photo: it alone; each photo's first view
    (2, 7, 0, 1, [0, 1, 2, 3, 4, 6]),  # nothing held out: six of trained products'; 2 originals
    (3, 0, 0, 1, []),  # no queries: the originals alone
])
def test_preview_samples_are_originals_then_spread_photos_of_both_kinds(trained, seen, unseen, views, shown):
    from types import SimpleNamespace

    from auditlens.training.train import ValidationSet, preview_samples

    originals = np.arange(trained, dtype=np.uint8)[:, None, None, None] * np.ones((1, 4, 4, 3), np.uint8)
    queries = seen + unseen
    # query q's view v is filled with 100 + 10 q + v
    images = (100 + 10 * np.arange(queries)[:, None] + np.arange(views)[None, :]).reshape(-1).astype(np.uint8)
    val = ValidationSet(images[:, None, None, None] * np.ones((1, 4, 4, 3), np.uint8), views,
                        labels=np.zeros(queries, int), seen=np.arange(queries) < seen, source="photos")
    order = np.arange(trained)[::-1]  # the indices train draws at random
    picked = preview_samples(SimpleNamespace(originals_clean=originals), val, order)
    n_orig = min(4, trained)
    assert picked.dtype == np.uint8 and picked.shape == (n_orig + len(shown), 4, 4, 3)
    assert picked[:n_orig, 0, 0, 0].tolist() == order[:n_orig].tolist()
    assert picked[n_orig:, 0, 0, 0].tolist() == [100 + 10 * q for q in shown]


def test_eer_and_auc_of_known_distributions():
    from auditlens.training.train import eer_auc

    rng = np.random.default_rng(0)
    eer, auc, _ = eer_auc(rng.normal(1, 1, 4000), rng.normal(0, 1, 4000))
    assert abs(eer - 0.3085) < 0.02 and abs(auc - 0.760) < 0.02  # d' = 1
    eer, auc, _ = eer_auc(np.array([0.9, 0.8]), np.array([0.1, 0.2, 0.3]))
    assert eer == 0.0 and auc == 1.0


def test_learning_rate_warms_up_then_decays_to_its_floor_by_epochs_or_budget(tmp_path):
    from auditlens.training.train import scheduled_learning_rate

    config = tiny_config(tmp_path, tmp_path, epochs=10, steps_per_epoch=150, learning_rate=2e-3)
    rates = [scheduled_learning_rate(config, step, 0.0) for step in range(1500)]
    # warm-up: 151 steps (a tenth of the 1,500, plus one), rising linearly to near the peak
    # from the floor of 1% of the peak (the first step's 1/151 is below it)
    assert rates[0] == 2e-3 * 0.01
    assert rates[10] == pytest.approx(2e-3 * 11 / 151, rel=1e-3)
    assert all(a < b for a, b in zip(rates[:150], rates[1:151]))
    assert max(rates) <= 2e-3 and rates[150] > 0.9 * 2e-3
    # then cosine decay, halfway at half the schedule, floored at 1% of the peak at the end
    assert all(a >= b for a, b in zip(rates[151:], rates[152:]))
    assert rates[750] == pytest.approx(2e-3 * 0.5 * (1 + math.cos(math.pi * 0.5)), rel=1e-9)
    assert rates[-1] == 2e-3 * 0.01
    # a --minutes budget ends the decay when it runs out, whatever the step
    budgeted = tiny_config(tmp_path, tmp_path, epochs=10, steps_per_epoch=150, minutes=2.0)
    assert scheduled_learning_rate(budgeted, 300, 60.0) == pytest.approx(
        budgeted.learning_rate * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert scheduled_learning_rate(budgeted, 300, 120.0) == budgeted.learning_rate * 0.01
    assert scheduled_learning_rate(budgeted, 300, 1.0) == scheduled_learning_rate(config, 300, 1.0)


def test_the_checkpoint_metric_ignores_products_held_out_of_training():
    # "seen" chooses the checkpoint: a held-out original that looks exactly like a trained
    # product's photos must not count against it ("unseen" and "all" still see every original).
    from types import SimpleNamespace

    import keras

    from auditlens.training.train import _evaluator

    rng = np.random.default_rng(0)
    originals = rng.normal(size=(4, 2, 2, 3)).astype(np.float32)
    originals[3] = originals[0]  # product d (held out) is a twin of product a
    photos = originals[[0, 1, 2, 3]] + 0.01 * rng.normal(size=(4, 2, 2, 3)).astype(np.float32)
    catalog = [SimpleNamespace(product_id=p, group=p) for p in "abcd"]
    data = SimpleNamespace(catalog=catalog, held_out={"d"}, originals_ref=originals)
    val = SimpleNamespace(images=photos, views=1, labels=np.arange(4), seen=np.array([1, 1, 1, 0], bool))
    encoder = keras.Sequential([keras.Input((2, 2, 3)), keras.layers.Flatten()])
    metrics = _evaluator(SimpleNamespace(input_size=2, latent_dim=12), encoder, data, val)()
    assert metrics["seen"]["n"] == 3 and metrics["seen"]["top1"] == 1.0 and metrics["seen"]["eer"] == 0.0
    assert metrics["all"]["top1"] < 1.0  # the twins are confused when every original competes


def test_an_encoder_at_chance_is_warned_about():
    from auditlens.training.train import collapse_warning

    assert "does not tell the validation products apart (AUC 0.50" in collapse_warning(
        {"seen": {"n": 40, "auc": 0.501, "eer": 0.5}})
    assert collapse_warning({"seen": {"n": 40, "auc": 0.93}}) is None
    same = {"seen": {"n": 40, "auc": 0.55, "impostor_mean": 0.999}}
    assert "Train longer (--epochs" in collapse_warning(same)
    assert "Train again with --bn-batches 20 (this run recomputed no BatchNorm" in collapse_warning(same, 0)
    assert collapse_warning({"seen": {"n": 0}}) is None and collapse_warning({}) is None


# -- slow ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_train_writes_every_output(trained):
    out = Path(trained.out_dir)
    for name in ("encoder.keras", "autoencoder.keras", "report.json", "augment_grid.png",
                 "training_curves.png", "latent_preview.png"):
        assert (out / name).is_file(), name
    # 4 trained originals, then 3 val photos of trained and 2 of held-out products (all
    # there are), two samples a row of input and reconstruction panels, 32 px each
    with Image.open(out / "latent_preview.png") as preview:
        assert preview.size == (2 * 2 * 32, 5 * 32)
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["holdout_fold"] == "1/3"
    assert len(report["history"]) == 2
    assert report["data"]["held_out_products"] and report["data"]["val_unseen"] > 0
    assert report["data"]["val_photos_also_trained"] == 0
    # val photos are embedded as the device embeds them (the default spec: the plain input)
    assert report["data"]["val_views"] == 1 and report["config"]["ema_decay"] > 0
    for subset in ("all", "seen", "unseen"):
        m = report["metrics"][subset]
        assert 0 <= m["eer"] <= 1 and 0 <= m["top1"] <= 1 and 0 <= m["auc"] <= 1
    assert np.isfinite(report["history"][-1]["loss"]["total"])

    import keras

    encoder = keras.models.load_model(out / "encoder.keras", compile=False)
    assert encoder.input_shape == (None, 32, 32, 3) and encoder.output_shape == (None, 16)

    # --keep-epochs: every epoch's averaged encoder; the best epoch's is the shipped one
    kept = sorted((out / "checkpoints").glob("encoder_epoch_*.keras"))
    assert [p.name for p in kept] == ["encoder_epoch_001.keras", "encoder_epoch_002.keras"]
    best = keras.models.load_model(kept[report["best_epoch"] - 1], compile=False)
    other = keras.models.load_model(kept[2 - report["best_epoch"]], compile=False)
    x = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(best.predict(x, verbose=0), encoder.predict(x, verbose=0), atol=1e-5)
    assert not np.allclose(other.predict(x, verbose=0), encoder.predict(x, verbose=0), atol=1e-5)


@pytest.mark.slow
def test_latent_preview_panels_are_the_input_and_the_decoders_redrawing(trained, tiny_data):
    import keras

    from auditlens.device_app.preprocess import PreprocessSpec, stack_inputs
    from auditlens.training.preview import attention_maps, preview_panels

    autoencoder = keras.models.load_model(Path(trained.autoencoder_path), compile=False)
    encoder = autoencoder.get_layer("auditlens_encoder")
    decoder = autoencoder.get_layer("auditlens_decoder")
    images = stack_inputs(sorted(tiny_data["catalog"].glob("*.png"))[:3], PreprocessSpec(input_size=32))
    panels = preview_panels(encoder, decoder, images)
    assert panels.shape == (3, 2, 32, 32, 3)  # average pooling: no attention panel
    assert attention_maps(encoder, images) is None
    np.testing.assert_array_equal(panels[:, 0], images)
    redrawn = autoencoder.predict(images.astype(np.float32), verbose=0)  # 16 px, 0..1
    assert redrawn.shape == (3, 16, 16, 3)
    shrunk = np.stack([np.asarray(Image.fromarray(p).resize((16, 16), Image.Resampling.BOX)) for p in panels[:, 1]])
    assert np.abs(shrunk / 255.0 - redrawn).mean() < 0.03


@pytest.mark.slow
def test_train_from_originals_alone(tiny_data, tmp_path):
    """No labelled photos at all: views of the originals are the positives, validation
    uses fixed augmented originals."""
    from auditlens.training.train import train

    config = tiny_config(tmp_path / "run", tiny_data["catalog"], epochs=1, steps_per_epoch=2,
                         class_weight=0.0)
    result = train(config)
    report = json.loads(Path(result.report_path).read_text())
    assert report["data"]["train_photos"] == 0
    assert report["data"]["val_queries"] == 4 * N_PRODUCTS
    assert Path(result.encoder_path).is_file()
    assert not [w for w in result.warnings if "no training photo" in w]  # every product alike


@pytest.mark.slow
def test_arcface_margin_replaces_the_cosface_term_in_training(tiny_data, tmp_path):
    """The same run (seed, data, steps) with ``arcface_margin`` trains on a different class
    term; the report records the margin."""
    from auditlens.training.train import train

    losses = {}
    for name, margin in (("cosface", 0.0), ("arcface", 0.3)):
        config = tiny_config(tmp_path / name, tiny_data["catalog"], photos=str(tiny_data["train"]),
                             epochs=1, steps_per_epoch=2, arcface_margin=margin)
        report = json.loads(Path(train(config).report_path).read_text())
        assert report["config"]["arcface_margin"] == margin
        losses[name] = report["history"][-1]["loss"]
    assert all(np.isfinite(v) for loss in losses.values() for v in loss.values())
    assert losses["arcface"]["cosface"] != pytest.approx(losses["cosface"]["cosface"], rel=1e-3)


@pytest.mark.slow
def test_anchor_weight_adds_its_term_to_training(tiny_data, tmp_path):
    """``anchor_weight`` adds the original-anchored term: it is logged, and the total is the
    weighted sum of the terms (one step, so the epoch's means are that step's values)."""
    from auditlens.training.train import train

    config = tiny_config(tmp_path / "run", tiny_data["catalog"], photos=str(tiny_data["train"]),
                         epochs=1, steps_per_epoch=1, anchor_weight=2.0)
    report = json.loads(Path(train(config).report_path).read_text())
    loss = report["history"][-1]["loss"]
    assert report["config"]["anchor_weight"] == 2.0
    assert loss["anchor"] > 0
    parts = loss["supcon"] + 0.5 * loss["cosface"] + loss["recon"] + 2.0 * loss["anchor"]
    assert loss["total"] == pytest.approx(parts, rel=1e-4)
    assert "distill" not in loss


@pytest.mark.slow
def test_train_with_made_up_products(tiny_data, tmp_path):
    """Every product of the catalogue and its photos also train as 11 made-up products."""
    from auditlens.training.train import train

    config = tiny_config(tmp_path / "run", tiny_data["catalog"], photos=str(tiny_data["train"]),
                         val_photos=str(tiny_data["val"]), epochs=1, steps_per_epoch=3,
                         pseudo_products=11)
    result = train(config)
    report = json.loads(Path(result.report_path).read_text())
    assert report["data"]["train_classes"] == 12 * N_PRODUCTS
    assert report["config"]["pseudo_products"] == 11
    assert np.isfinite(report["history"][-1]["loss"]["total"])
    # validation is on the real products only
    assert report["data"]["val_queries"] == N_PRODUCTS

    # a folder catalogue has no kinds: twins of "Packages" only would be twins of nothing
    from auditlens.errors import CatalogError

    with pytest.raises(CatalogError, match="no trained product is of these kinds"):
        train(tiny_config(tmp_path / "none", tiny_data["catalog"], photos=str(tiny_data["train"]),
                          epochs=1, steps_per_epoch=1, pseudo_products=3, pseudo_kinds=("Packages",)))


@pytest.mark.slow
def test_stop_epoch_ships_that_epoch_of_a_longer_schedule(tiny_data, tmp_path):
    """--stop-epoch runs the first N epochs of the --epochs schedule and keeps epoch N."""
    import keras

    from auditlens.training.train import train

    config = tiny_config(tmp_path / "run", tiny_data["catalog"], photos=str(tiny_data["train"]),
                         val_photos=str(tiny_data["val"]), epochs=5, stop_epoch=2, steps_per_epoch=2,
                         keep_epochs=True)
    result = train(config)
    report = json.loads(Path(result.report_path).read_text())
    assert [h["epoch"] for h in report["history"]] == [1, 2]
    assert report["timings"]["steps"] == 4
    assert result.best_epoch == 2 and report["checkpoint_choice"].startswith("last epoch")
    shipped = keras.saving.load_model(result.encoder_path, compile=False)
    kept = keras.saving.load_model(tmp_path / "run" / "checkpoints" / "encoder_epoch_002.keras", compile=False)
    for a, b in zip(shipped.get_weights(), kept.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert not (tmp_path / "run" / "checkpoints" / "encoder_epoch_003.keras").exists()
    # the learning rate followed the 5-epoch cosine (step 4 of 10: 0.79 of the peak), not a
    # 2-epoch one (step 4 of 4: 0.15 of the peak)
    assert report["history"][-1]["lr"] == pytest.approx(config.learning_rate * 0.5 * (1 + np.cos(np.pi * 0.3)))
    with pytest.raises(ValueError, match="outside the schedule"):
        train(tiny_config(tmp_path / "bad", tiny_data["catalog"], epochs=3, stop_epoch=4))

    # the same folder again: refused, as the new run would overwrite the old one file by
    # file; with overwrite, the earlier run's files go first (epoch 2 does not linger)
    from auditlens.errors import CatalogError, OutputPathError

    run = tmp_path / "run"
    with pytest.raises(OutputPathError, match="holds an earlier training run .*--overwrite"):
        train(tiny_config(run, tiny_data["catalog"], epochs=1, steps_per_epoch=1))
    # --overwrite with an input that cannot be read: refused before the earlier run is touched
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    with pytest.raises(CatalogError, match="missing.csv"):
        train(tiny_config(run, tiny_data["catalog"], photos=str(tmp_path / "missing.csv"), overwrite=True))
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
    (run / "notes.txt").write_text("mine")
    train(tiny_config(run, tiny_data["catalog"], epochs=1, steps_per_epoch=1, keep_epochs=True,
                      overwrite=True))
    assert sorted(p.name for p in (run / "checkpoints").glob("encoder_epoch_*")) == ["encoder_epoch_001.keras"]
    assert (run / "notes.txt").read_text() == "mine"
    assert len(json.loads((run / "report.json").read_text())["history"]) == 1


@pytest.mark.slow
def test_a_diverging_run_says_so_and_leaves_nothing_in_the_way(tiny_data, tmp_path):
    """A loss that stops being a number is a clear error, not an internal one, and the run
    that failed before its first checkpoint leaves no folder that would refuse the rerun."""
    from auditlens.errors import TrainingDivergedError
    from auditlens.training.train import train

    run = tmp_path / "run"
    with pytest.raises(TrainingDivergedError, match=r"training diverged: the loss became (nan|inf) at step \d+; lower --lr"):
        train(tiny_config(run, tiny_data["catalog"], learning_rate=1e30, epochs=1, steps_per_epoch=5))
    assert not run.exists()
    train(tiny_config(run, tiny_data["catalog"], epochs=1, steps_per_epoch=1))  # no --overwrite needed
    assert (run / "encoder.keras").is_file()

    # --overwrite, and the new run diverges before its first checkpoint: the earlier run is
    # put back as it was, not lost
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(TrainingDivergedError):
        train(tiny_config(run, tiny_data["catalog"], learning_rate=1e30, epochs=1, steps_per_epoch=5,
                          overwrite=True))
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    # and a run that finishes replaces it, keeping nothing of it aside
    train(tiny_config(run, tiny_data["catalog"], epochs=1, steps_per_epoch=1, overwrite=True))
    assert not (run / ".replaced-run").exists()
    assert (run / "encoder.keras").read_bytes() != before[Path("encoder.keras")]


def test_a_folder_of_another_commands_files_is_not_taken_for_a_run(tiny_data, tmp_path):
    """A report.json that no run wrote (an evaluation's) is neither called an earlier run
    nor removed by --overwrite."""
    from auditlens.errors import OutputPathError
    from auditlens.training.train import train

    out = tmp_path / "eval"
    out.mkdir()
    (out / "report.json").write_text('{"protocol": {}, "overall": {}}')
    for overwrite in (False, True):
        with pytest.raises(OutputPathError, match="holds report.json, not written by a training run"):
            train(tiny_config(out, tiny_data["catalog"], overwrite=overwrite))
    assert (out / "report.json").read_text() == '{"protocol": {}, "overall": {}}'


@pytest.mark.slow
def test_validating_on_the_training_photos_is_warned_about(tiny_data, tmp_path, capsys):
    from auditlens.training.train import main

    assert main([str(tiny_data["catalog"]), "--photos", str(tiny_data["train"]), "--val-photos",
                 str(tiny_data["train"]), "--out", str(tmp_path / "run"), "--input-size", "32",
                 "--latent-dim", "16", "--width", "8", "--epochs", "1", "--steps-per-epoch", "1",
                 "--products-per-batch", "4", "--views-per-product", "3", "--quiet"]) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["data"]["val_photos_also_trained"] == report["data"]["val_queries"] == 2 * N_PRODUCTS
    assert (f"warning: {2 * N_PRODUCTS} of the {2 * N_PRODUCTS} validation photos are training photos "
            "too (is --val-photos the --photos file?)") in capsys.readouterr().err


@pytest.mark.slow
def test_products_without_photos_beside_products_with_them_are_warned_about(tiny_data, tmp_path, capsys):
    """Two of six products lose their photos: train says how many, and names one."""
    from auditlens.training.train import main

    rows = [line.split(",") for line in tiny_data["train"].read_text().splitlines()[1:]]
    some = write_csv(tmp_path / "some.csv", ["photo", "product_id"],
                     [[str(tiny_data["root"] / r[0]), r[1]] for r in rows if r[1] not in ("product-4", "product-5")])
    assert main([str(tiny_data["catalog"]), "--photos", str(some), "--out", str(tmp_path / "run"),
                 "--input-size", "32", "--latent-dim", "16", "--width", "8", "--epochs", "1",
                 "--steps-per-epoch", "1", "--products-per-batch", "4", "--views-per-product", "3",
                 "--quiet"]) == 0
    said = capsys.readouterr().err
    assert ("warning: 2 of the 6 trained products have no training photo (first: 'product-4') and "
            "train from their originals alone") in said
    assert "leave them out of the training catalogue" in said


@pytest.mark.slow
def test_cli_arguments_reach_the_config(tiny_data, tmp_path, capsys):
    import argparse

    from auditlens.training.train import add_train_arguments, config_from_args

    parser = add_train_arguments(argparse.ArgumentParser())
    args = parser.parse_args([str(tiny_data["catalog"]), "--out", str(tmp_path), "--minutes", "2",
                              "--holdout-fold", "2/4", "--no-paste-background", "--recon-weight", "0",
                              "--no-mirror", "--ema-decay", "0", "--weight-decay", "0.05",
                              "--keep-epochs", "--pseudo-products", "5", "--pseudo-kinds", "Packages", "Bottles",
                              "--epochs", "25", "--stop-epoch", "10", "--temperature", "0.2",
                              "--cosface-scale", "30", "--cosface-margin", "0.35", "--arcface-margin", "0.3",
                              "--seed", "3", "--data-seed", "4"])
    config = config_from_args(args)
    assert (config.temperature, config.cosface_scale, config.cosface_margin) == (0.2, 30.0, 0.35)
    assert config.arcface_margin == 0.3 and (config.seed, config.data_seed) == (3, 4)
    assert config.minutes == 2 and config.holdout_fold == "2/4"
    assert not config.paste_background and config.recon_weight == 0
    assert not config.mirror and config.ema_decay == 0
    assert config.weight_decay == 0.05 and config.keep_epochs and config.pseudo_products == 5
    assert config.pseudo_kinds == ("Packages", "Bottles")
    assert config.epochs == 25 and config.stop_epoch == 10
    assert config_from_args(parser.parse_args([str(tiny_data["catalog"]), "--out", str(tmp_path)])).pseudo_kinds == ()
    with pytest.raises(SystemExit):
        parser.parse_args([str(tiny_data["catalog"]), "--out", str(tmp_path), "--pseudo-products", "12"])


def test_settings_and_splits_that_cannot_train_are_refused_before_training(tiny_data, tmp_path):
    """Each used to fail late (after an epoch) with an internal error, or run and hold
    nothing out; now each is one clear message before a model is built."""
    import shutil

    from auditlens.errors import CatalogError
    from auditlens.training.train import holdout_products, train

    for field, value in (("epochs", 0), ("steps_per_epoch", 0), ("products_per_batch", 1),
                         ("views_per_product", 1)):
        flag = "--" + field.replace("_", "-")
        with pytest.raises(ValueError, match=f"{flag} must be at least"):
            train(tiny_config(tmp_path / field, tiny_data["catalog"], **{field: value}))

    # two views leave no slot for a field photo: training would silently ignore --photos
    with pytest.raises(ValueError, match="no room for a field photo"):
        train(tiny_config(tmp_path / "v2", tiny_data["catalog"], views_per_product=2,
                          photos=str(tiny_data["train"])))
    empty = write_csv(tmp_path / "empty_val.csv", ["photo", "product_id"], [])
    with pytest.raises(CatalogError, match="no validation photo of a catalogue product"):
        train(tiny_config(tmp_path / "ev", tiny_data["catalog"], val_photos=str(empty)))
    with pytest.raises(ValueError, match="--group-pairs 1.5 is not a share within 0..1"):
        train(tiny_config(tmp_path / "gp", tiny_data["catalog"], group_pairs=1.5))
    with pytest.raises(ValueError, match="--temperature 0.0 and --cosface-scale 20.0 must both be more than 0"):
        train(tiny_config(tmp_path / "t0", tiny_data["catalog"], temperature=0.0))
    with pytest.raises(ValueError, match="--cosface-margin 1.0 is not a cosine margin within 0..1"):
        train(tiny_config(tmp_path / "cm", tiny_data["catalog"], cosface_margin=1.0))
    with pytest.raises(ValueError, match="--arcface-margin 2.0 is not an angle within 0..pi/2"):
        train(tiny_config(tmp_path / "am", tiny_data["catalog"], arcface_margin=2.0))
    with pytest.raises(ValueError, match="--minutes 0 must be more than 0"):
        train(tiny_config(tmp_path / "m0", tiny_data["catalog"], minutes=0))
    with pytest.raises(ValueError, match="outside MobileNetV2's blocks 1 to 17"):
        train(tiny_config(tmp_path / "tb", tiny_data["catalog"], backbone="mobilenet_v2", trunk_blocks=18))
    # settings that used to crash TensorFlow natively (threads), train into nonsense (a
    # negative rate), or fail with a message that did not name the flag
    for name, overrides, message in (
            ("th", {"threads": -1}, "--threads -1 is outside 0"),
            ("lr", {"learning_rate": -1.0}, "--lr -1.0 must be a number more than 0"),
            ("ln", {"learning_rate": math.nan}, "--lr nan must be a number more than 0"),
            ("wd", {"weight_decay": -0.1}, "--weight-decay -0.1 must be a number of at least 0"),
            ("rw", {"recon_weight": math.inf}, "--recon-weight inf must be a number of at least 0"),
            ("ld", {"latent_dim": 0}, "--latent-dim must be at least 1, not 0"),
            ("wi", {"width": 0}, "--width must be at least 1, not 0"),
            ("is", {"input_size": 8}, "--input-size must be at least 16, not 8"),
            ("sd", {"seed": -1}, r"--seed -1 is outside 0 to 2\*\*32 - 1"),
            ("ds", {"data_seed": 2**32}, r"--data-seed 4294967296 is outside 0 to 2\*\*32 - 1"),
            ("ed", {"ema_decay": 1.5}, "--ema-decay 1.5 is not a decay within 0..1"),
            ("pk", {"pseudo_kinds": ("Packages",)}, "--pseudo-kinds .* needs --pseudo-products")):
        with pytest.raises(ValueError, match=message):
            train(tiny_config(tmp_path / name, tiny_data["catalog"], **overrides))
        assert not (tmp_path / name).exists()  # refused before anything was written

    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(tiny_data["catalog"] / "product-0.png", one)
    with pytest.raises(CatalogError, match=r"1 product\(s\) to train on: .* needs at least 2"):
        train(tiny_config(tmp_path / "r1", one))

    ids = [f"product-{i}" for i in range(N_PRODUCTS)]
    assert not holdout_products(ids, "7/10")  # 6 products, 10 folds: fold 7 is empty
    with pytest.raises(CatalogError, match=r"--holdout-fold 7/10 holds out none of the 6 products"):
        train(tiny_config(tmp_path / "r2", tiny_data["catalog"], holdout_fold="7/10"))

    contradictory = write_csv(tmp_path / "contra.csv", ["photo", "product_id"],
                              [[str(tiny_data["root"] / "photos" / "p0_0.jpg"), "product-0"],
                               [str(tiny_data["root"] / "photos" / "p0_0.jpg"), "product-1"]])
    with pytest.raises(CatalogError, match=r"contra.csv: .*p0_0.jpg is labelled both product-0 and product-1"):
        train(tiny_config(tmp_path / "ct", tiny_data["catalog"], photos=str(contradictory)))

    held = holdout_products(ids, "1/3")
    unseen_val = write_csv(tmp_path / "unseen_val.csv", ["photo", "product_id"],
                           [[str(tiny_data["root"] / "photos" / f"p{p.split('-')[1]}_2.jpg"), p]
                            for p in sorted(held)])
    with pytest.raises(CatalogError, match="no validation photo shows a trained product"):
        train(tiny_config(tmp_path / "r3", tiny_data["catalog"], holdout_fold="1/3",
                          val_photos=str(unseen_val)))


@pytest.fixture(scope="module")
def soup_runs(tiny_data, trained, tmp_path_factory):
    """Runs beside ``trained`` (seed 1, fold 1/3): the same start without background
    pasting, another seed (and latent size), and the same seed holding out another fold."""
    from auditlens.training.train import train

    root = tmp_path_factory.mktemp("soup_runs")
    common = dict(photos=str(tiny_data["train"]), val_photos=str(tiny_data["val"]), epochs=1)
    runs = {"same start": train(tiny_config(root / "b", tiny_data["catalog"], holdout_fold="1/3",
                                            paste_background=False, **common)),
            "other seed": train(tiny_config(root / "c", tiny_data["catalog"], holdout_fold="1/3",
                                            seed=2, latent_dim=8, **common)),
            "other fold": train(tiny_config(root / "d", tiny_data["catalog"], holdout_fold="2/3", **common))}
    return {name: Path(r.encoder_path) for name, r in runs.items()}


@pytest.mark.slow
def test_a_soup_averages_runs_from_one_start_and_exports_like_a_run(trained, soup_runs, tmp_path, capsys):
    import keras

    from auditlens.catalog import read_product_ids
    from auditlens.cli import main
    from auditlens.export.quantize import trained_crop

    first, second = Path(trained.encoder_path), soup_runs["same start"]
    out = tmp_path / "soup"
    assert main(["soup", str(first.parent), str(second), "--out", str(out)]) == 0
    assert "soup of 2 encoders" in capsys.readouterr().out
    soup, a, b = (keras.models.load_model(p, compile=False) for p in (out / "encoder.keras", first, second))
    differ = 0
    for ws, wa, wb in zip(soup.weights, a.weights, b.weights):
        np.testing.assert_allclose(ws.numpy(), (wa.numpy() + wb.numpy()) / 2, rtol=1e-6, atol=1e-7)
        differ += not np.array_equal(wa.numpy(), wb.numpy())
    assert differ > 10  # the two runs trained apart: the average is a third model
    report = json.loads((out / "report.json").read_text())
    assert [i["config"]["paste_background"] for i in report["soup"]["ingredients"]] == [True, False]
    # what export and evaluate read from a run's report: its crop and its held-out products
    assert trained_crop(out / "encoder.keras") == "center"
    held = json.loads(Path(trained.report_path).read_text())["data"]["held_out_products"]
    assert held and read_product_ids(out / "report.json") == set(held)
    # the soup names what its ingredients share, so it can be an ingredient itself
    assert report["config"]["seed"] == 1 and report["config"]["latent_dim"] == 16
    assert main(["soup", str(out), str(second), "--out", str(tmp_path / "again")]) == 0
    capsys.readouterr()
    # an existing soup is not overwritten
    assert main(["soup", str(first), str(second), "--out", str(out)]) == 2
    assert "exists; give a new --out folder" in capsys.readouterr().err


@pytest.mark.slow
def test_a_soup_of_runs_that_cannot_be_averaged_is_refused(trained, soup_runs, tmp_path, capsys):
    import shutil

    from auditlens.cli import main

    first = Path(trained.encoder_path)
    for others, message in (
            ([soup_runs["other seed"]], "the runs differ in seed"),
            ([soup_runs["other fold"]], "the runs held out different products"),
            ([first], "the same encoder is given twice"),
            ([], "a soup needs at least two encoders"),
            ([tmp_path / "none.keras"], "no such encoder")):
        out = tmp_path / f"refused{len(message)}"
        assert main(["soup", str(first), *map(str, others), "--out", str(out)]) == 2
        assert message in capsys.readouterr().err
        assert not out.exists()
    # without their reports nothing tells the seeds apart: the weights' shapes still do
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(first, bare / "a.keras")
    shutil.copy(soup_runs["other seed"], bare / "b.keras")
    assert main(["soup", str(bare / "a.keras"), str(bare / "b.keras"), "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "no training report beside" in err and "different architectures" in err


@pytest.mark.slow
def test_another_data_seed_starts_from_the_same_weights_on_other_batches(tiny_data, tmp_path, capsys):
    """``--data-seed`` changes the batches and augmentation, not the starting weights: at a
    learning rate of almost nothing the trained weights stay at their start, so two data
    seeds end level while another ``--seed`` does not, and the runs soup."""
    import keras

    from auditlens.cli import main
    from auditlens.training.train import train

    common = dict(photos=str(tiny_data["train"]), val_photos=str(tiny_data["val"]), epochs=1,
                  learning_rate=1e-9)
    runs = {name: train(tiny_config(tmp_path / name, tiny_data["catalog"], **common, **extra))
            for name, extra in (("a", {}), ("b", {"data_seed": 2}), ("c", {"seed": 2}))}
    models = {name: keras.models.load_model(r.encoder_path, compile=False) for name, r in runs.items()}
    reports = {name: json.loads(Path(r.report_path).read_text()) for name, r in runs.items()}
    assert reports["b"]["config"]["data_seed"] == 2 and reports["a"]["config"]["data_seed"] is None

    def gap(x, y):
        return max(float(np.abs(wx.numpy() - wy.numpy()).max())
                   for wx, wy in zip(models[x].trainable_weights, models[y].trainable_weights))

    assert gap("a", "b") < 1e-5 < 1e-2 < gap("a", "c")
    # ... on other batches: the first epoch's losses differ by far more than run-to-run noise
    loss_a, loss_b = (reports[n]["history"][0]["loss"]["total"] for n in "ab")
    assert abs(loss_a - loss_b) > 1e-3 * abs(loss_a), (loss_a, loss_b)
    assert main(["soup", runs["a"].encoder_path, runs["b"].encoder_path, "--out", str(tmp_path / "s")]) == 0
    assert "soup of 2 encoders" in capsys.readouterr().out
