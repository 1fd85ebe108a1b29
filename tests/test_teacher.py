"""Teacher features (auditlens teacher-features) and their distillation in training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from auditlens.errors import CatalogError
from tests.test_training import tiny_config, tiny_data  # noqa: F401  (fixture)

pytest.importorskip("keras")


def small_teacher(path: Path) -> Path:
    """A fixed random Keras network (RGB 0..255 in, a 12-d vector out), saved as .keras."""
    import keras

    keras.utils.set_random_seed(3)
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(12, 5, strides=2, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    keras.Model(inputs, x).save(path)
    return path


def test_features_are_the_teachers_output_on_the_device_input(tiny_data, tmp_path):  # noqa: F811
    import keras

    from auditlens.catalog import open_catalog, read_labelled_photos
    from auditlens.cli import main
    from auditlens.device_app.preprocess import PreprocessSpec, load_model_input
    from auditlens.training.teacher import image_key, load_teacher_features

    model = small_teacher(tmp_path / "teacher.keras")
    out = tmp_path / "t.npz"
    # the train and val CSVs together, and the train CSV twice: every image once
    assert main(["teacher-features", str(tiny_data["catalog"]), "--photos", str(tiny_data["train"]),
                 str(tiny_data["val"]), str(tiny_data["train"]), "--model", str(model),
                 "--input-size", "40", "--out", str(out), "--quiet"]) == 0
    feats = load_teacher_features(out)
    originals = [p.image for p in open_catalog(tiny_data["catalog"])]
    photos = [p.photo for p in read_labelled_photos(tiny_data["train"]) + read_labelled_photos(tiny_data["val"])]
    assert sorted(feats.keys) == sorted(image_key(s) for s in originals + photos)
    assert feats.dim == 12
    net = keras.saving.load_model(model, compile=False)
    spec = PreprocessSpec(input_size=40, crop="center")
    for source in (originals[2], photos[5]):
        device_input = load_model_input(source, spec)  # reduced JPEG decoding, as on the device
        expected = np.asarray(net(device_input[None].astype(np.float32)))[0]
        np.testing.assert_allclose(feats.lookup([source], "image")[0], expected, rtol=1e-5, atol=1e-6)


def test_lookup_is_by_content_and_names_a_missing_image(tmp_path):
    from auditlens.training.teacher import image_key, load_teacher_features, save_teacher_features

    a, b = tmp_path / "a.jpg", tmp_path / "b.jpg"
    a.write_bytes(b"first image")
    b.write_bytes(b"second image")

    save_teacher_features(tmp_path / "t.npz", [image_key(a), image_key(a)], np.array([[1.0, 2.0], [3.0, 4.0]]))
    feats = load_teacher_features(tmp_path / "t.npz")
    assert feats.keys == (image_key(a),)  # the duplicate kept its first row
    moved = tmp_path / "renamed.jpg"
    moved.write_bytes(a.read_bytes())
    np.testing.assert_array_equal(feats.lookup([moved, b"first image"], "photo"), [[1, 2], [1, 2]])
    with pytest.raises(CatalogError, match=r"no feature for the photo .*b\.jpg"):
        feats.lookup([a, b], "photo")


@pytest.mark.parametrize("content, message", [
    (dict(keys=np.array(["k1", "k2"]), features=np.ones((3, 4), np.float32)), "2 keys but features of shape"),
    (dict(keys=np.array(["k1"]), features=np.full((1, 4), np.nan, np.float32)), "NaN"),
    (dict(keys=np.array(["k1", "k1"]), features=np.ones((2, 4), np.float32)), "appears twice"),
    (dict(vectors=np.ones((2, 4), np.float32)), "not a keys/features"),
])
def test_malformed_teacher_files_are_refused(tmp_path, content, message):
    from auditlens.training.teacher import load_teacher_features

    np.savez(tmp_path / "t.npz", **content)
    with pytest.raises(CatalogError, match=message):
        load_teacher_features(tmp_path / "t.npz")
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(CatalogError, match="not a keys/features"):
        load_teacher_features(tmp_path / "text.npz")


def test_targets_are_centred_unit_directions():
    from auditlens.training.teacher import centred_targets

    out = centred_targets(np.array([[4.0, 1.0], [1.0, 5.0]]), np.array([1.0, 1.0]))
    np.testing.assert_allclose(out, [[1.0, 0.0], [0.0, 1.0]])


def test_teacher_backends_refuse_what_they_cannot_load(tiny_data, tmp_path, capsys):  # noqa: F811
    from auditlens.cli import main

    base = ["teacher-features", str(tiny_data["catalog"]), "--out", str(tmp_path / "t.npz"), "--quiet"]
    assert main([*base, "--model", "keras:MobileNetV2"]) == 2
    assert "needs --weights" in capsys.readouterr().err  # no silent download of ImageNet weights
    assert main([*base, "--model", "keras:NoSuchNet", "--weights", "x.h5"]) == 2
    assert "unknown keras application" in capsys.readouterr().err
    assert main([*base, "--model", "torchvision:mobilenet_v2"]) == 2
    err = capsys.readouterr().err
    assert "needs --weights" in err or "not installed" in err
    assert not (tmp_path / "t.npz").exists()


@pytest.mark.slow
def test_training_distils_the_teacher_and_refuses_an_incomplete_file(tiny_data, tmp_path):  # noqa: F811
    from auditlens.catalog import open_catalog
    from auditlens.cli import main
    from auditlens.training.teacher import image_key, load_teacher_features, save_teacher_features
    from auditlens.training.train import train

    model = small_teacher(tmp_path / "teacher.keras")
    feats_path = tmp_path / "t.npz"
    assert main(["teacher-features", str(tiny_data["catalog"]), "--photos", str(tiny_data["train"]),
                 "--model", str(model), "--input-size", "40", "--out", str(feats_path), "--quiet"]) == 0
    config = tiny_config(tmp_path / "run", tiny_data["catalog"], photos=str(tiny_data["train"]),
                         epochs=3, steps_per_epoch=4, teacher_features=str(feats_path), distill_weight=2.0)
    report = json.loads(Path(train(config).report_path).read_text())
    assert report["data"]["teacher"] == {"features": str(feats_path), "dim": 12}
    distill = [h["loss"]["distill"] for h in report["history"]]
    assert len(distill) == 3  # one distillation loss an epoch (its values: test_distill_loss_*)
    total = report["history"][0]["loss"]  # and it enters the total with its weight
    parts = total["supcon"] + 0.5 * total["cosface"] + total["recon"] + 2.0 * total["distill"]
    assert total["total"] == pytest.approx(parts, rel=1e-4)

    # a file without the training photos: refused, naming one, before any step
    originals = [p.image for p in open_catalog(tiny_data["catalog"])]
    save_teacher_features(tmp_path / "originals_only.npz", [image_key(s) for s in originals],
                          load_teacher_features(feats_path).lookup(originals, "original"))
    config.teacher_features = str(tmp_path / "originals_only.npz")
    config.out_dir = str(tmp_path / "refused")
    with pytest.raises(CatalogError, match=r"no feature for the training photo .*p\d+_\d\.jpg"):
        train(config)
    assert not (tmp_path / "refused" / "report.json").exists()


@pytest.mark.slow
def test_a_keras_application_teacher_loads_its_weights_from_disk(tiny_data, tmp_path):  # noqa: F811
    """keras:NAME builds the application without its classifier and takes the weights
    file given (the offline way: no download)."""
    import keras

    from auditlens.catalog import open_catalog
    from auditlens.cli import main
    from auditlens.device_app.preprocess import PreprocessSpec, stack_inputs
    from auditlens.training.teacher import load_teacher_features

    keras.utils.set_random_seed(5)
    net = keras.applications.MobileNetV3Small(include_top=False, weights=None, pooling="avg",
                                              input_shape=(64, 64, 3))
    net.save_weights(tmp_path / "small.weights.h5")
    out = tmp_path / "t.npz"
    assert main(["teacher-features", str(tiny_data["catalog"]), "--model", "keras:MobileNetV3Small",
                 "--weights", str(tmp_path / "small.weights.h5"), "--input-size", "64",
                 "--out", str(out), "--quiet"]) == 0
    originals = [p.image for p in open_catalog(tiny_data["catalog"])]
    expected = np.asarray(net(stack_inputs(originals, PreprocessSpec(input_size=64)).astype(np.float32)))
    np.testing.assert_allclose(load_teacher_features(out).lookup(originals, "original"), expected,
                               rtol=1e-4, atol=1e-5)


def test_a_teacher_weights_file_that_is_not_there_is_named(tiny_data, tmp_path, capsys):  # noqa: F811
    from auditlens.cli import main

    missing = tmp_path / "mobilenet_v2.h5"
    assert main(["teacher-features", str(tiny_data["catalog"]), "--model", "keras:MobileNetV2", "--weights",
                 str(missing), "--out", str(tmp_path / "t.npz"), "--quiet"]) == 2
    assert capsys.readouterr().err.strip() == f"auditlens: error: --weights {missing}: no such file"
    assert not (tmp_path / "t.npz").exists()


def test_distill_loss_against_hand_computed_values():
    import tensorflow as tf

    from auditlens.training.losses import distill_loss

    targets = tf.constant([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    # cosines: 1 (same direction, any length), 0 (orthogonal), -0.6 (3,-4 against 1,0)
    projected = tf.constant([[5.0, 0.0], [2.0, 0.0], [-3.0, 4.0]])
    assert float(distill_loss(projected, targets, [True, True, True])) == pytest.approx((0 + 1 + 1.6) / 3)
    assert float(distill_loss(projected, targets, [True, False, True])) == pytest.approx((0 + 1.6) / 2)
    assert float(distill_loss(projected, targets, [False, False, False])) == 0.0
