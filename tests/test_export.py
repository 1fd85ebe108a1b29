"""Export: int8 / float16 conversion of a freshly trained tiny encoder and its drift check."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import SAMPLE, product_image

tf = pytest.importorskip("tensorflow")

pytestmark = pytest.mark.slow


def _train_tiny(root: Path, **overrides) -> dict:
    from auditlens.training.config import TrainConfig
    from auditlens.training.train import train

    originals = root / "originals"
    originals.mkdir()
    for i in range(5):
        product_image(i, 80).save(originals / f"item-{i}.png")
    values = dict(
        catalog=str(originals), out_dir=str(root / "run"), input_size=32, latent_dim=16, width=8,
        head_channels=32, recon_size=16, epochs=1, steps_per_epoch=3, products_per_batch=4,
        views_per_product=3, progress=False,
        bn_batches=0,  # as trained: three steps leave the BatchNorm statistics stale (every latent
    )                  # nearly alike); the collapse test below recomputes them
    config = TrainConfig(**{**values, **overrides})
    result = train(config)
    return {"root": root, "catalog": originals, "encoder": result.encoder_path}


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory) -> dict:
    return _train_tiny(tmp_path_factory.mktemp("export"))


def images_of(catalog: Path, size: int = 32) -> np.ndarray:
    from auditlens.catalog import open_catalog
    from auditlens.device_app.preprocess import PreprocessSpec, to_model_input

    spec = PreprocessSpec(input_size=size)
    rng = np.random.default_rng(0)
    clean = [to_model_input(p.open(), spec) for p in open_catalog(catalog)]
    noisy = [np.clip(c + rng.normal(0, 12, c.shape), 0, 255).astype(np.uint8) for c in clean]
    return np.stack(clean + noisy)


def test_int8_latents_agree_with_keras(tiny_encoder, tmp_path):
    import keras
    from ai_edge_litert.interpreter import Interpreter

    from auditlens.export.quantize import QuantizationConfig, export_encoder, run_tflite

    rep = images_of(tiny_encoder["catalog"])
    out = tmp_path / "encoder.tflite"
    report = export_encoder(tiny_encoder["encoder"], rep, out, QuantizationConfig.for_int8(rep))
    assert out.is_file() and report.size_bytes == out.stat().st_size
    assert report.input_dtype == "uint8" and report.output_dtype == "int8"
    assert report.n_images == len(rep) and report.mean_cosine > 0.97 and report.worst_cosine > 0.9

    # independently of the report: dequantized int8 latents vs Keras latents, by cosine
    encoder = keras.models.load_model(tiny_encoder["encoder"], compile=False)
    ref = np.asarray(encoder(rep.astype(np.float32)))
    got = run_tflite(out.read_bytes(), rep)
    cos = np.sum(ref * got, 1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
    assert cos.min() > 0.9

    interpreter = Interpreter(model_path=str(out), num_threads=1)
    scale, zero = interpreter.get_input_details()[0]["quantization"]
    assert scale > 0  # the device reads the input's scale/zero point from the model


@pytest.mark.parametrize("pooling, pooling_ops, side", [
    ("avgmax", {"REDUCE_MAX", "MEAN", "CONCATENATION"}, 32),
    ("attention", {"LOGISTIC", "MUL", "MEAN"}, 64),  # 64 px: a 2 x 2 map, not one weight
])
def test_other_poolings_quantize_to_int8(tmp_path, pooling, pooling_ops, side):
    """--pooling avgmax (the global maximum beside the average) and attention (an average
    weighted by a learnt 0..1 map) stay int8 ops, and the int8 latents agree with the Keras
    model's as the average-pooled encoder's do."""
    from ai_edge_litert.interpreter import Interpreter

    from auditlens.export.quantize import QuantizationConfig, export_encoder

    tiny = _train_tiny(tmp_path, pooling=pooling, input_size=side)
    rep = images_of(tiny["catalog"], side)
    out = tmp_path / "encoder.tflite"
    report = export_encoder(tiny["encoder"], rep, out, QuantizationConfig.for_int8(rep))
    assert report.mean_cosine > 0.97 and report.worst_cosine > 0.9
    ops = {d["op_name"] for d in Interpreter(model_path=str(out))._get_ops_details()}
    assert pooling_ops <= ops and "DEQUANTIZE" not in ops  # no float island in the graph

    # the run's latent_preview.png: input, reconstruction and (attention only) where it looks
    import keras

    from auditlens.training.preview import attention_maps

    panels = 3 if pooling == "attention" else 2
    with Image.open(tiny["root"] / "run" / "latent_preview.png") as preview:
        # 4 originals, then 6 of the augmented originals that stand in for val photos: 5 rows
        assert preview.size == (2 * panels * side, 5 * side)
        grid = np.asarray(preview.convert("RGB"))
    encoder = keras.models.load_model(tiny["encoder"], compile=False)
    shown = grid[:side, :side]  # the first sample's input, and its lit panel two panels on
    maps = attention_maps(encoder, shown[None])
    if pooling == "attention":
        from auditlens.training.preview import light_by

        assert maps.shape == (1, 2, 2)
        expected = light_by(shown, maps[0]).astype(int)
        assert np.abs(grid[:side, 2 * side:3 * side].astype(int) - expected).max() <= 1
        assert (expected < shown).any()  # the map is not flat: some of the input is dimmed
    else:
        assert maps is None

    from auditlens.training.model import ModelSpec, build_encoder

    with pytest.raises(ValueError, match="unknown pooling 'gem'; choose from avg, avgmax, attention"):
        build_encoder(ModelSpec(input_size=32, pooling="gem"))


def test_float16_export(tiny_encoder, tmp_path):
    from auditlens.export.quantize import QuantizationConfig, export_encoder

    rep = images_of(tiny_encoder["catalog"])
    report = export_encoder(tiny_encoder["encoder"], rep, tmp_path / "f16.tflite",
                            QuantizationConfig.for_float16())
    assert report.input_dtype == "float32" and report.output_dtype == "float32"
    assert report.worst_cosine > 0.999


def test_float32_export_computes_what_keras_computes(tiny_encoder, tmp_path):
    import keras

    from auditlens.export.quantize import QuantizationConfig, export_encoder, run_tflite

    rep = images_of(tiny_encoder["catalog"])
    out = tmp_path / "f32.tflite"
    report = export_encoder(tiny_encoder["encoder"], rep, out, QuantizationConfig.for_float32())
    assert report.mode == "float32" and report.input_dtype == "float32"
    encoder = keras.models.load_model(tiny_encoder["encoder"], compile=False)
    np.testing.assert_allclose(run_tflite(out.read_bytes(), rep), np.asarray(encoder(rep.astype(np.float32))),
                               rtol=1e-3, atol=1e-4)
    # four bytes a weight: larger than the float16 conversion of the same encoder
    f16 = export_encoder(tiny_encoder["encoder"], rep, tmp_path / "f16.tflite", QuantizationConfig.for_float16())
    assert report.size_bytes > 1.5 * f16.size_bytes


def test_drift_raises_and_writes_nothing(tiny_encoder, tmp_path):
    from auditlens.errors import ModelError
    from auditlens.export.quantize import QuantizationConfig, export_encoder

    rep = images_of(tiny_encoder["catalog"])
    out = tmp_path / "strict.tflite"
    # No int8 model matches float exactly, so an exactness requirement must be refused.
    strict = QuantizationConfig.for_int8(rep, min_worst_cosine=1.0 + 1e-6)
    with pytest.raises(ModelError, match="drifts"):
        export_encoder(tiny_encoder["encoder"], rep, out, strict)
    assert not out.exists()

    # A representative set of the wrong size is refused before converting.
    with pytest.raises(ModelError):
        export_encoder(tiny_encoder["encoder"], np.zeros((2, 40, 40, 3), np.uint8), out)


def test_export_cli_writes_model_card(tiny_encoder, tmp_path, capsys):
    import argparse

    from auditlens.export.quantize import add_export_arguments, run_export

    out = tmp_path / "encoder.tflite"
    args = add_export_arguments(argparse.ArgumentParser()).parse_args(
        [tiny_encoder["encoder"], "--representative", str(tiny_encoder["catalog"]), "--out", str(out)])
    assert run_export(args) == 0
    card = json.loads(out.with_suffix(".json").read_text())
    # the card carries the whole spec, photo views included, so enrolment embeds as trained
    from auditlens.device_app.preprocess import PreprocessSpec

    assert PreprocessSpec.from_dict(card["preprocess"]) == PreprocessSpec(32)
    assert card["preprocess"]["photo_zooms"] == [1.0] and card["preprocess"]["photo_mirror"] is False
    assert card["export"]["mode"] == "int8" and card["export"]["worst_cosine"] <= 1.0
    assert card["export"]["compared_on"] == "calibration images (the ones it was calibrated on)"
    from auditlens.device_app.interpreter import model_id_of

    assert card["model_id"] == model_id_of(out.read_bytes())  # the card names its model
    assert card["representative"]["originals"] == card["representative"]["calibration_images"] == 5
    said = capsys.readouterr()
    assert "worst" in said.out
    # five studio originals, nothing else: a weak calibration and the most lenient check, said
    assert "int8 is calibrated on only 5 images (5 originals, no field photos)" in said.err
    assert "the drift check runs on the images int8 was calibrated on" in said.err

    # with more field photos than calibrate, the drift is measured on the ones left out
    from auditlens.export.quantize import comparison_photos

    photos = tmp_path / "photos.csv"
    rows = [f"{tiny_encoder['catalog'] / f'item-{i % 5}.png'},item-{i % 5}" for i in range(9)]
    photos.write_text("photo,product_id\n" + "\n".join(rows) + "\n")
    spec = PreprocessSpec(32)
    assert comparison_photos(str(photos), spec, max_photos=9, least=1) is None  # all calibrate
    assert comparison_photos(str(photos), spec, max_photos=4, least=1).shape == (5, 32, 32, 3)
    assert comparison_photos(str(photos), spec, max_photos=4, count=2, least=1).shape == (2, 32, 32, 3)
    assert comparison_photos(str(photos), spec, max_photos=0, least=1).shape == (9, 32, 32, 3)  # none calibrate
    # five spare photos are too few to rest the check on: the calibration images are used
    assert comparison_photos(str(photos), spec, max_photos=4) is None
    with pytest.raises(SystemExit):  # argparse: "must be 0 or more"
        add_export_arguments(argparse.ArgumentParser()).parse_args(
            [tiny_encoder["encoder"], "--representative", "x", "--out", "y", "--max-photos", "-1"])
    args = add_export_arguments(argparse.ArgumentParser()).parse_args(
        [tiny_encoder["encoder"], "--representative", str(tiny_encoder["catalog"]), "--out", str(out),
         "--photos", str(photos), "--max-photos", "4"])
    assert run_export(args) == 0
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["export"]["compared_on"] == "calibration images (the ones it was calibrated on)"
    assert card["representative"]["n_images"] == card["export"]["n_images"] == 9  # 5 originals + 4 photos
    # the originals are checked as the references every photo is scored against
    export = card["export"]
    assert export["references"] == 5 and export["decision_pairs"] == 9 * 5
    assert 0 < export["reference_worst_cosine"] <= export["reference_mean_cosine"] <= 1.0
    assert 0 <= export["score_error_mean"] <= export["score_error_p99"] <= export["score_error_max"]
    assert 0 <= export["decisions_flipped"] <= 45 and export["flip_threshold"] == 0.5
    printed = capsys.readouterr().out
    assert "drift vs Keras on the 5 originals (the references)" in printed
    assert "TensorSpec" not in printed  # Keras's saved-graph signatures are not the export's output


def test_export_command_prints_no_runtime_notices(tiny_encoder, tmp_path):
    """`auditlens export` as a user runs it: TensorFlow's start-up notices, the converter's
    settings line and its input-statistics warning stay out of stderr, the command's own
    warnings stay in. A TF_CPP_MIN_LOG_LEVEL of the user's own leaves TensorFlow's lines be."""
    import os
    import subprocess
    import sys

    notices = ("absl::InitializeLog()", "I0000 ", "fully_quantize:", "Statistics for quantized inputs")
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "AUDITLENS_DEBUG")}
    errs = {}
    for name, extra in (("default", {}), ("user level", {"TF_CPP_MIN_LOG_LEVEL": "0"})):
        out = tmp_path / f"{name.replace(' ', '_')}.tflite"
        proc = subprocess.run([sys.executable, "-m", "auditlens.cli", "export", str(tiny_encoder["encoder"]),
                               "--representative", str(tiny_encoder["catalog"]), "--out", str(out)],
                              capture_output=True, text=True, timeout=300, env={**env, **extra})
        assert proc.returncode == 0 and out.is_file(), proc.stderr
        assert "int8 is calibrated on only 5 images" in proc.stderr  # the command's own warning
        errs[name] = proc.stderr
    assert not [line for line in errs["default"].splitlines() if any(n in line for n in notices)]
    assert "I0000 " in errs["user level"]  # TensorFlow's own lines, shown at the user's level


def test_export_refuses_what_would_lose_the_model(tiny_encoder, tmp_path, capsys):
    """`--out enc.json` would be overwritten by its own model card; the run's
    autoencoder.keras is not an encoder: both refused before any conversion."""
    import argparse

    from auditlens.export.quantize import add_export_arguments, run_export

    def export(model, out):
        args = add_export_arguments(argparse.ArgumentParser()).parse_args(
            [str(model), "--representative", str(tiny_encoder["catalog"]), "--out", str(out)])
        return run_export(args)

    assert export(tiny_encoder["encoder"], tmp_path / "enc.json") == 2
    assert "name the model file NAME.tflite" in capsys.readouterr().err
    assert not (tmp_path / "enc.json").exists()

    # a crop other than the one the run trained with (its report.json) would mis-cut photos
    args = add_export_arguments(argparse.ArgumentParser()).parse_args(
        [tiny_encoder["encoder"], "--representative", str(tiny_encoder["catalog"]), "--crop", "full",
         "--out", str(tmp_path / "full.tflite")])
    assert run_export(args) == 2
    assert "trained with crop 'center'" in capsys.readouterr().err
    assert not (tmp_path / "full.tflite").exists()

    autoencoder = Path(tiny_encoder["encoder"]).with_name("autoencoder.keras")
    assert autoencoder.is_file()
    assert export(autoencoder, tmp_path / "ae.tflite") == 2
    err = capsys.readouterr().err
    assert "not an image encoder" in err and "export the run's encoder.keras" in err
    assert not (tmp_path / "ae.tflite").exists()


def test_originals_drifting_are_refused_as_references(tiny_encoder, tmp_path):
    """The originals' own drift is measured and held to the worst-cosine gate, with how far
    the scores against them move; nothing is written when they fail it."""
    from auditlens.errors import ModelError
    from auditlens.export.quantize import QuantizationConfig, export_encoder

    rep = images_of(tiny_encoder["catalog"])
    out = tmp_path / "enc.tflite"
    loose = QuantizationConfig.for_int8(rep, min_worst_cosine=0.0, min_mean_cosine=0.0)
    report = export_encoder(tiny_encoder["encoder"], rep, out, loose, references=rep[:5])
    assert report.references == 5 and report.decision_pairs == len(rep) * 5
    assert report.reference_worst_cosine < 1.0 and report.score_error_max > 0
    out.unlink()
    gate = (report.reference_worst_cosine + 1.0) / 2  # above the originals' worst
    strict = QuantizationConfig.for_int8(rep, min_worst_cosine=gate, min_mean_cosine=0.0)
    with pytest.raises(ModelError, match=r"on the catalogue's originals .* worst cosine"):
        export_encoder(tiny_encoder["encoder"], rep, out, strict, references=rep[:5])
    assert not out.exists()


def test_export_arguments_refused_before_converting(tiny_encoder, tmp_path, capsys):
    import argparse

    from auditlens.export.quantize import add_export_arguments, calibration_images, run_export

    parser = add_export_arguments(argparse.ArgumentParser())
    for bad in ("nan", "1.5"):  # nan compared false with every cosine: the gate was off
        with pytest.raises(SystemExit):
            parser.parse_args([tiny_encoder["encoder"], "--representative", "x", "--out", "y.tflite",
                               "--min-worst-cosine", bad])
    (tmp_path / "enc.tflite").mkdir()
    args = parser.parse_args([tiny_encoder["encoder"], "--representative", str(tiny_encoder["catalog"]),
                              "--out", str(tmp_path / "enc.tflite")])
    assert run_export(args) == 2
    assert "is a folder; give a file name" in capsys.readouterr().err
    (tmp_path / "not.keras").write_text("text")
    args = parser.parse_args([str(tmp_path / "not.keras"), "--representative", str(tiny_encoder["catalog"]),
                              "--out", str(tmp_path / "x.tflite")])
    assert run_export(args) == 2
    assert "not a Keras model auditlens can read" in capsys.readouterr().err
    # a folder of its own that does not exist yet is made, as for every other output
    args = parser.parse_args([tiny_encoder["encoder"], "--representative", str(tiny_encoder["catalog"]),
                              "--out", str(tmp_path / "new" / "enc.tflite")])
    assert run_export(args) == 0 and (tmp_path / "new" / "enc.json").is_file()

    # a large catalogue leaves half of the calibration set to the field photos
    small = np.zeros((400, 2, 2, 3), np.uint8)
    assert calibration_images(small, originals=300) is small  # under the cap: all of them
    kinds = calibration_images(np.concatenate([np.zeros((5000, 2, 2, 3), np.uint8),
                                               np.ones((300, 2, 2, 3), np.uint8)]), originals=5000)
    assert int(kinds[:, 0, 0, 0].sum()) == 250  # 250 photos (ones) beside 250 originals
    few_photos = calibration_images(np.concatenate([np.zeros((5000, 2, 2, 3), np.uint8),
                                                    np.ones((100, 2, 2, 3), np.uint8)]), originals=5000)
    assert len(few_photos) == 500 and int(few_photos[:, 0, 0, 0].sum()) == 100


def test_int8_with_the_first_ops_in_float(tiny_encoder, tmp_path, capsys):
    """--float-ops N: the graph's first N ops compute in float (their outputs are float32
    tensors, where the full int8 model has none past its input), the rest stays int8, and
    the model takes and gives float32."""
    from ai_edge_litert.interpreter import Interpreter

    from auditlens.export.quantize import QuantizationConfig, export_encoder

    rep = images_of(tiny_encoder["catalog"])

    def float_tensors(path):
        interpreter = Interpreter(model_path=str(path))
        return [t["name"] for t in interpreter.get_tensor_details()
                if t["dtype"] == np.float32 and not t["name"].startswith("serving_default")]

    full = export_encoder(tiny_encoder["encoder"], rep, tmp_path / "full.tflite", QuantizationConfig.for_int8(rep))
    mixed = export_encoder(tiny_encoder["encoder"], rep, tmp_path / "mixed.tflite",
                           QuantizationConfig.for_int8(rep, float_ops=3))
    assert (full.input_dtype, full.float_ops) == ("uint8", 0)
    assert (mixed.input_dtype, mixed.output_dtype, mixed.float_ops) == ("float32", "float32", 3)
    assert "TensorSpec" not in capsys.readouterr().out  # Keras's signature dump, on this path too
    assert len(float_tensors(tmp_path / "mixed.tflite")) > len(float_tensors(tmp_path / "full.tflite"))
    assert mixed.worst_cosine > 0.9
    interpreter = Interpreter(model_path=str(tmp_path / "mixed.tflite"))
    assert any(t["dtype"] == np.int8 for t in interpreter.get_tensor_details())  # the rest is int8
    with pytest.raises(ValueError, match="float_ops must be >= 0"):
        QuantizationConfig.for_int8(rep, float_ops=-1)


def test_products_held_out_of_training_never_calibrate(tiny_encoder, tmp_path, capsys, monkeypatch):
    # A held-out product's figures must not rest on int8 ranges fitted to its own images.
    import argparse

    from auditlens.catalog import open_catalog
    from auditlens.device_app.preprocess import PreprocessSpec, to_model_input
    from auditlens.errors import CatalogError
    from auditlens.export.quantize import (
        add_export_arguments,
        comparison_photos,
        representative_images,
        run_export,
    )

    catalog = tiny_encoder["catalog"]
    photos = tmp_path / "photos.csv"
    photos.write_text("photo,product_id\n" + "".join(
        f"{catalog / f'item-{i % 5}.png'},item-{i % 5}\n" for i in range(9)))
    report = tmp_path / "report.json"  # as 'auditlens train --holdout-fold' writes it
    report.write_text(json.dumps({"data": {"held_out_products": ["item-1", "item-3", "Item-9"]}}))
    spec = PreprocessSpec(32)
    held_out = {"item-1", "item-3"}

    rep, originals = representative_images(str(catalog), spec, str(photos), exclude=held_out)
    kept = np.stack([to_model_input(p.open(), spec) for p in open_catalog(catalog)
                     if p.product_id not in held_out])
    assert originals == 3 and np.array_equal(rep[:3], kept)
    assert len(rep) == 3 + 5  # the 4 photos of items 1 and 3 are left out too
    assert comparison_photos(str(photos), spec, max_photos=0, least=1, exclude=held_out).shape == (5, 32, 32, 3)
    with pytest.raises(CatalogError, match="no original left"):
        representative_images(str(catalog), spec, exclude={f"item-{i}" for i in range(5)})
    # a large catalogue lends only as many originals as export uses, evenly spread
    import auditlens.export.quantize as quantize

    monkeypatch.setattr(quantize, "MAX_REPRESENTATIVE_ORIGINALS", 2)
    few, originals = representative_images(str(catalog), spec)
    everything = np.stack([to_model_input(p.open(), spec) for p in open_catalog(catalog)])
    assert originals == 2 and np.array_equal(few, everything[[0, 4]])
    monkeypatch.undo()

    out = tmp_path / "enc.tflite"
    args = add_export_arguments(argparse.ArgumentParser()).parse_args(
        [tiny_encoder["encoder"], "--representative", str(catalog), "--photos", str(photos),
         "--exclude-products", str(report), "--out", str(out), "--min-worst-cosine", "0"])
    assert run_export(args) == 0, capsys.readouterr().err
    card = json.loads(out.with_suffix(".json").read_text())
    # an id the catalogue does not hold excludes nothing: said, and not recorded as excluded
    assert ("--exclude-products names 1 id(s) the catalogue does not hold, which exclude nothing: "
            "'Item-9'") in capsys.readouterr().err
    assert card["representative"]["excluded_products"] == ["item-1", "item-3"]
    assert card["representative"]["n_images"] == 8 and card["export"]["references"] == 3


def test_a_run_folder_given_to_export_is_answered_with_the_files_inside_it(tmp_path, capsys):
    from auditlens.cli import main

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for name in ("autoencoder.keras", "encoder.keras", "checkpoints/encoder_epoch_009.keras",
                 "checkpoints/encoder_epoch_010.keras"):
        (run / name).write_bytes(b"")
    rc = main(["export", str(run), "--representative", str(SAMPLE / "catalog.csv"), "--out", str(tmp_path / "m.tflite")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"auditlens: error: {run} is a folder: export a .keras file")
    assert f"e.g. {run / 'encoder.keras'} or {run / 'checkpoints' / 'encoder_epoch_010.keras'}" in err
    assert "autoencoder.keras" not in err  # a run writes it too, and export refuses it


def test_an_encoder_that_gives_every_image_one_latent_is_flagged_by_export_and_refused_by_enroll(
        tiny_encoder, tmp_path, capsys):
    """A run too short (a review's 150-300 steps from scratch gave the originals a mean
    cosine of 0.9999 between products) passed export's drift check at cosine 1, enrolled,
    and verified a lemon as a banana: MATCH at 1.000. Here an encoder whose latent barely
    depends on the image."""
    import argparse

    import keras

    from auditlens.cli import main
    from auditlens.export.quantize import add_export_arguments, run_export

    inputs = keras.Input((32, 32, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(inputs)
    latent = keras.layers.Dense(16, kernel_initializer=keras.initializers.RandomNormal(stddev=1e-6),
                                bias_initializer="ones")(pooled)
    flat = tmp_path / "flat.keras"
    keras.Model(inputs, latent).save(flat)
    out = tmp_path / "flat.tflite"
    args = add_export_arguments(argparse.ArgumentParser()).parse_args(
        [str(flat), "--representative", str(tiny_encoder["catalog"]), "--out", str(out)])
    assert run_export(args) == 0
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["export"]["cross_cosine"] > 0.99
    assert "the encoder gives every image nearly the same latent" in capsys.readouterr().err
    assert main(["enroll", str(tiny_encoder["catalog"]), "--model", str(out), "--out", str(tmp_path / "b"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "gives every original nearly the same latent" in err and "any photo would MATCH" in err
    assert not (tmp_path / "b").exists()
    # a three-step run as trained is one too (its BatchNorm statistics still hold their
    # early values) ...
    stale = tmp_path / "stale.tflite"
    args = add_export_arguments(argparse.ArgumentParser()).parse_args(
        [tiny_encoder["encoder"], "--representative", str(tiny_encoder["catalog"]), "--out", str(stale)])
    assert run_export(args) == 0
    assert json.loads(stale.with_suffix(".json").read_text())["export"]["cross_cosine"] >= 0.999
    assert "nearly the same latent" in capsys.readouterr().err
    # ... which train mends by default: it recomputes them and says so
    (tmp_path / "mended").mkdir()
    mended = _train_tiny(tmp_path / "mended", bn_batches=20)
    report = json.loads((Path(mended["encoder"]).parent / "report.json").read_text())
    assert all(h["val"].get("batchnorm_recomputed") for h in report["history"])
    good = tmp_path / "good.tflite"
    args = add_export_arguments(argparse.ArgumentParser()).parse_args(
        [mended["encoder"], "--representative", str(mended["catalog"]), "--out", str(good), "--float16"])
    assert run_export(args) == 0
    assert json.loads(good.with_suffix(".json").read_text())["export"]["cross_cosine"] < 0.999
    assert "nearly the same latent" not in capsys.readouterr().err
    assert main(["enroll", str(mended["catalog"]), "--model", str(good), "--out", str(tmp_path / "b"),
                 "--no-progress"]) == 0


def test_cells_export_gives_cells_that_average_to_the_latent(tiny_encoder, tmp_path):
    import keras

    from auditlens.device_app.interpreter import Encoder, l2_normalize
    from auditlens.export.quantize import QuantizationConfig, export_encoder, with_cells

    model = keras.models.load_model(tiny_encoder["encoder"], compile=False)
    images = images_of(tiny_encoder["catalog"])
    latent, cells = (np.asarray(a) for a in with_cells(model)(images.astype(np.float32), training=False))
    bias = model.get_layer("latent").get_weights()[1]
    np.testing.assert_allclose(cells.mean(axis=(1, 2)) + bias, latent, atol=1e-4)

    out = tmp_path / "cells.tflite"
    report = export_encoder(model, images, out, QuantizationConfig.for_float32(), cells=True)
    assert report.cells == cells.shape[1] * cells.shape[2] and report.cells_mean_cosine > 0.999
    encoder = Encoder(out)
    assert encoder.has_cells and encoder.cell_count == report.cells
    got_latent, got_cells = encoder.embed_with_cells(images)
    np.testing.assert_allclose(got_latent, l2_normalize(latent), atol=1e-4)
    np.testing.assert_allclose(got_cells, l2_normalize(cells.reshape(got_cells.shape)), atol=1e-4)
    export_encoder(model, images, tmp_path / "plain.tflite", QuantizationConfig.for_float32())
    assert not Encoder(tmp_path / "plain.tflite").has_cells


def test_cells_are_refused_for_an_encoder_that_does_not_average_its_feature_map(tmp_path):
    from auditlens.errors import ModelError
    from auditlens.export.quantize import with_cells
    from auditlens.training.model import ModelSpec, build_encoder

    with pytest.raises(ModelError, match="pools otherwise"):
        with_cells(build_encoder(ModelSpec(input_size=32, width=8, head_channels=16, latent_dim=8,
                                           backbone="scratch", pooling="attention")))
