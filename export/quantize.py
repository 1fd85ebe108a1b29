"""Convert a trained Keras encoder to TFLite and prove the conversion kept its latents.

``auditlens export MODEL --representative CATALOG [--photos CSV] --out encoder.tflite``

Quantization is a value (:class:`QuantizationConfig`): full int8 (the default, what
ships: uint8 pixels in, int8 latent out, scales and zero points read by the device from
the model), float16 weights, dynamic-range, or float32 (the Keras model unchanged, the
reference an int8 model's accuracy is judged against). One function applies it to the
converter.

After converting, :func:`export_encoder` runs the TFLite model with ``ai_edge_litert`` on
the representative images and compares its L2-normalised latents with the Keras ones; the
device compares latents by cosine, so cosine is the drift measure. A conversion whose
worst cosine falls below the mode's threshold raises :class:`~auditlens.errors.ModelError`
instead of shipping a silently broken model.

TensorFlow is imported here only (the device side never imports it).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from auditlens.catalog import open_catalog, read_labelled_photos, read_product_ids
from auditlens.cli import cosine_threshold, non_negative_int
from auditlens.device_app.interpreter import (
    Encoder,
    l2_normalize,
    model_id_of,
    runtime_notices_dropped,
    without_stderr_lines,
)
from auditlens.device_app.preprocess import PreprocessSpec, stack_inputs
from auditlens.errors import AuditlensError, CatalogError, ModelError
from auditlens.export.enroll import DEFAULT_THRESHOLD
from auditlens.files import atomic_write, check_output_file

INT8_MIN_WORST_COSINE = 0.90
"""Int8 export fails if any representative image's latent is less similar than this to
the float one (a calibration gone wrong drops far below; healthy int8 stays above ~0.95)."""
INT8_MIN_MEAN_COSINE = 0.97
"""Int8 export fails if the mean cosine to the float latents is below this."""
FLOAT16_MIN_WORST_COSINE = 0.999
"""Float16 weights change latents only in the 4th digit; anything worse is a bug."""
FLOAT32_MIN_WORST_COSINE = 0.9999
"""A float32 conversion computes what Keras computes, up to kernel rounding."""
DYNAMIC_MIN_WORST_COSINE = 0.97
"""Dynamic-range (int8 weights, float activations) export threshold."""
MAX_COMPARE_IMAGES = 1000
"""Images the drift check compares at most (its pairwise check grows with the square)."""
COMPARE_PHOTOS = 200
"""Field photos, outside the calibration set, the CLI's drift check uses at most."""
MIN_COMPARE_PHOTOS = 50
"""Spare field photos the drift check needs to rest on them; with fewer it uses the
calibration images (a check on one or two photos would say nothing)."""
MAX_CALIBRATION_IMAGES = 500
"""Calibration images used at most (more adds conversion time, not accuracy)."""

MAX_REPRESENTATIVE_ORIGINALS = MAX_COMPARE_IMAGES
"""Originals a large catalogue lends export, evenly spread: calibration and both drift
checks take at most this many, so no more are decoded (100k originals at 128 px would
be 4.9 GB)."""

FEW_CALIBRATION_IMAGES = 100
"""Below this many calibration images export warns: int8 ranges fitted to a handful of
images may clip on the field photos a device sees."""


@dataclass(frozen=True)
class QuantizationConfig:
    """How to quantize: build with :meth:`for_int8`, :meth:`for_float16`, :meth:`for_dynamic`
    or :meth:`for_float32`."""

    mode: str
    """'int8', 'float16', 'dynamic' or 'float32'."""
    representative: np.ndarray | None = field(default=None, repr=False, compare=False)
    """uint8 (N, S, S, 3) calibration images (int8 only), preprocessed like on the device."""
    input_type: str = "float32"
    """Inference input type: 'uint8' or 'int8' for full int8, else 'float32'."""
    output_type: str = "float32"
    """Inference output type: 'int8' for full int8, else 'float32'."""
    min_worst_cosine: float = INT8_MIN_WORST_COSINE
    """Export raises ModelError when the worst cosine (TFLite vs Keras latent) is below this."""
    min_mean_cosine: float = 0.0
    """Export raises ModelError when the mean cosine is below this."""
    float_ops: int = 0
    """int8 only: keep the graph's first N quantizable ops in float (input normalisation,
    stem, first block: where a pretrained trunk's int8 drift starts); input and output
    are then float32."""

    @classmethod
    def for_int8(
        cls, representative: np.ndarray, input_type: str = "uint8",
        min_worst_cosine: float = INT8_MIN_WORST_COSINE, min_mean_cosine: float = INT8_MIN_MEAN_COSINE,
        float_ops: int = 0,
    ) -> QuantizationConfig:
        """Full integer model. uint8 input takes the camera's pixels unchanged (the
        in-graph Rescaling folds into the input scale); the latent comes out int8. With
        ``float_ops`` the first ops stay float and the model takes and gives float32."""
        rep = np.asarray(representative)
        if rep.ndim != 4 or rep.shape[-1] != 3 or rep.dtype != np.uint8 or len(rep) == 0:
            raise ValueError(f"representative images must be uint8 (N, S, S, 3), got {rep.dtype} {rep.shape}")
        if input_type not in ("uint8", "int8"):
            raise ValueError(f"int8 input type must be 'uint8' or 'int8', not {input_type!r}")
        if float_ops < 0:
            raise ValueError(f"float_ops must be >= 0, not {float_ops}")
        if float_ops:
            return cls("int8", rep, "float32", "float32", min_worst_cosine, min_mean_cosine, float_ops)
        return cls("int8", rep, input_type, "int8", min_worst_cosine, min_mean_cosine)

    @classmethod
    def for_float16(cls, min_worst_cosine: float = FLOAT16_MIN_WORST_COSINE) -> QuantizationConfig:
        """Float16 weights, float32 input/output (half the size of float32, GPU-friendly)."""
        return cls("float16", None, "float32", "float32", min_worst_cosine, 0.0)

    @classmethod
    def for_dynamic(cls, min_worst_cosine: float = DYNAMIC_MIN_WORST_COSINE) -> QuantizationConfig:
        """Int8 weights, float activations; no calibration data needed."""
        return cls("dynamic", None, "float32", "float32", min_worst_cosine, 0.0)

    @classmethod
    def for_float32(cls, min_worst_cosine: float = FLOAT32_MIN_WORST_COSINE) -> QuantizationConfig:
        """No quantization: the Keras model as TFLite, to measure what int8 costs in accuracy
        with the same enrolment and evaluation as the shipped model."""
        return cls("float32", None, "float32", "float32", min_worst_cosine, 0.0)


@dataclass
class ExportReport:
    """What an export produced and how close it stays to the Keras encoder."""

    out_path: str
    mode: str
    size_bytes: int
    n_images: int
    """Images the latents were compared on."""
    mean_cosine: float
    """Mean cosine between TFLite and Keras L2-normalised latents."""
    worst_cosine: float
    """Lowest cosine over the compared images."""
    min_worst_cosine: float
    """Threshold the worst cosine had to meet."""
    similarity_mae: float | None
    """Mean |TFLite - Keras| of the cosine between two *different* images: the error the
    device's decision score itself sees (a latent's own cosine can stay high while the
    small differences between products are quantized away)."""
    similarity_max_error: float | None
    """Largest such error over all image pairs (None for both with fewer than two images)."""
    input_dtype: str
    output_dtype: str
    input_shape: list[int]
    latent_dim: int
    input_quantization: tuple[float, int]
    """(scale, zero point) of the input; (0.0, 0) when not quantized."""
    output_quantization: tuple[float, int]
    """(scale, zero point) of the output; (0.0, 0) when not quantized."""
    latency_ms_median: float
    """Median time of one image on 1 interpreter thread on this machine."""
    convert_seconds: float
    float_ops: int = 0
    """Ops kept in float at the start of an int8 graph (0: full int8)."""
    compared_on: str = "representative images"
    """Which images the drift was measured on: field photos kept out of the int8
    calibration when there are spare ones, else the calibration images themselves."""
    references: int = 0
    """Catalogue originals checked as the device's references (0: none given)."""
    reference_mean_cosine: float | None = None
    reference_worst_cosine: float | None = None
    """The originals' TFLite-vs-Keras cosine: studio shots on white drift differently
    from field photos, and every verdict scores a photo against one of them."""
    score_error_mean: float | None = None
    score_error_p99: float | None = None
    score_error_max: float | None = None
    """|TFLite - Keras| of the photo-vs-original cosine, the verdict's score, over every
    compared image x original pair."""
    decisions_flipped: int | None = None
    decision_pairs: int | None = None
    """Of those pairs, how many land on the other side of ``flip_threshold`` than Keras put them."""
    flip_threshold: float = DEFAULT_THRESHOLD
    """The uncalibrated default threshold of a bundle (the calibrated one comes later)."""
    cross_cosine: float | None = None
    """Mean Keras cosine between *different* compared images: near 1, the encoder gives
    every image the same latent (:func:`collapse_note`)."""
    cells: int = 0
    """Feature-map cells the model also gives per image (``--cells``; 0: the latent alone)."""
    cells_mean_cosine: float | None = None
    """Mean TFLite-vs-Keras cosine of those cells over the compared images."""

    def to_dict(self) -> dict:
        return asdict(self)


def collapse_note(report: ExportReport) -> str | None:
    """What to tell an engineer whose encoder gives every compared image nearly the same
    latent (a drift check then passes, at cosine 1, on a model that tells nothing apart)."""
    from auditlens.evaluation.metrics import ONE_LATENT_COSINE

    if report.cross_cosine is None or report.cross_cosine < ONE_LATENT_COSINE:
        return None
    return (f"the encoder gives every image nearly the same latent (mean cosine {report.cross_cosine:.4f} "
            f"between different images of the {report.n_images} compared, as if each were a copy of the others): "
            "its drift figures say nothing, and enroll refuses it; train it longer, and keep --bn-batches "
            "above 0 (BatchNorm statistics recomputed after a short run)")


def spread_indices(n: int, k: int) -> np.ndarray:
    """``k`` indices evenly spread over ``range(n)``, first and last included (k < n)."""
    return np.linspace(0, n - 1, k).round().astype(int)


def _tf():
    import tensorflow as tf

    return tf


def calibration_images(rep: np.ndarray, originals: int) -> np.ndarray:
    """At most MAX_CALIBRATION_IMAGES of ``rep`` (its first ``originals`` images the
    catalogue's originals, then field photos), evenly spread within each kind and half of
    each where both have enough: a large catalogue must not crowd out the field photos the
    device mostly embeds."""
    photos = len(rep) - originals
    if len(rep) <= MAX_CALIBRATION_IMAGES:
        return rep
    take_photos = min(photos, max(MAX_CALIBRATION_IMAGES // 2, MAX_CALIBRATION_IMAGES - originals))
    take_originals = MAX_CALIBRATION_IMAGES - take_photos
    return np.concatenate([rep[:originals][spread_indices(originals, take_originals)],
                           rep[originals:][spread_indices(photos, take_photos)] if take_photos else rep[:0]])


def _calibration_dataset(rep: np.ndarray) -> Callable:
    """The converter's representative dataset: at most MAX_CALIBRATION_IMAGES images,
    evenly spread (deterministic), as the float model's input (raw 0..255 pixels)."""
    if len(rep) > MAX_CALIBRATION_IMAGES:
        rep = rep[spread_indices(len(rep), MAX_CALIBRATION_IMAGES)]

    def dataset():
        for image in rep:
            yield [image[None].astype(np.float32)]

    return dataset


def _convert_with_float_ops(tf, make_converter, dataset, float_ops: int) -> bytes:
    """int8 with the graph's first ``float_ops`` quantizable ops left in float, through
    TFLite's QuantizationDebugger: one calibrated run names the ops in graph order, a
    second converts with the first ones denylisted."""
    with warnings.catch_warnings():
        # the debugger runs TensorFlow's own deprecated tf.lite.Interpreter inside: a notice
        # the user cannot act on (auditlens itself runs models with ai-edge-litert)
        warnings.filterwarnings("ignore", message=r"(?s).*tf\.lite\.Interpreter is deprecated", category=UserWarning)
        debugger = tf.lite.experimental.QuantizationDebugger(converter=make_converter(), debug_dataset=dataset)
        debugger.run()
        table = io.StringIO()
        debugger.layer_statistics_dump(table)
        table.seek(0)
        names = [row["tensor_name"] for row in csv.DictReader(table)]
        if float_ops > len(names):
            raise ModelError(f"float_ops {float_ops}: the model has only {len(names)} quantizable ops")
        options = tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=names[:float_ops])
        debugger = tf.lite.experimental.QuantizationDebugger(
            converter=make_converter(), debug_dataset=dataset, debug_options=options)
        return debugger.get_nondebug_quantized_model()


def convert(model, config: QuantizationConfig) -> bytes:
    """Apply ``config`` to ``TFLiteConverter.from_keras_model(model)`` and convert."""
    if config.mode not in ("int8", "float16", "dynamic", "float32"):
        raise ValueError(f"unknown quantization mode {config.mode!r}")
    tf = _tf()
    dataset = _calibration_dataset(config.representative) if config.mode == "int8" else None

    def make_converter():
        converter = tf.lite.TFLiteConverter.from_keras_model(model)
        if config.mode != "float32":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if config.mode == "int8":
            converter.representative_dataset = dataset
        elif config.mode == "float16":
            converter.target_spec.supported_types = [tf.float16]
        return converter

    try:  # Keras prints the saved graph's every signature at each conversion: hundreds of lines
        with contextlib.redirect_stdout(io.StringIO()), _without_converter_notices():
            if config.float_ops:
                return _convert_with_float_ops(tf, make_converter, dataset, config.float_ops)
            converter = make_converter()
            if config.mode == "int8":  # full integer: int8 kernels only, quantized input and output
                converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
                converter.inference_input_type = tf.uint8 if config.input_type == "uint8" else tf.int8
                converter.inference_output_type = tf.int8
            return converter.convert()
    except ModelError:
        raise
    except Exception as exc:  # the converter raises many types; name the step that failed
        what = f"{config.mode}, {config.float_ops} float ops" if config.float_ops else config.mode
        raise ModelError(f"TFLite conversion ({what}) failed: {exc}") from exc


@contextlib.contextmanager
def _without_converter_notices():
    """The converter's warning that a uint8 input has no given statistics (int8 calibration
    sets them), and, where this process is the caller's own (the command line), the
    quantizer's C++ line of settings ("fully_quantize: 0, inference_type: 6, ...")."""
    quiet = runtime_notices_dropped()
    with (without_stderr_lines(lambda line: line.startswith(b"fully_quantize:")) if quiet
          else contextlib.nullcontext()), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Statistics for quantized inputs were expected")
        yield


def _both_latents(encoder, content: bytes, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(Keras, TFLite) raw latents of uint8 ``images``."""
    keras_latents = np.concatenate([
        np.asarray(encoder(images[i : i + 64].astype(np.float32), training=False))
        for i in range(0, len(images), 64)
    ])
    return keras_latents, run_tflite(content, images)


def _cross_cosine(latents: np.ndarray) -> float | None:
    from auditlens.evaluation.metrics import mean_cross_cosine

    return None if len(latents) < 3 else mean_cross_cosine(l2_normalize(latents))


def _reference_check(encoder, content: bytes, references: np.ndarray | None,
                     keras_queries: np.ndarray, queries: np.ndarray) -> dict:
    """The :class:`ExportReport` fields on the originals: their own drift, and how far the
    score of each compared image against each of them moves from Keras's."""
    if references is None or not len(references):
        return {}
    references = np.asarray(references, np.uint8)
    if len(references) > MAX_COMPARE_IMAGES:
        references = references[spread_indices(len(references), MAX_COMPARE_IMAGES)]
    keras_refs, refs = _both_latents(encoder, content, references)
    cos = cosine_rows(refs, keras_refs)
    keras_scores = l2_normalize(keras_queries) @ l2_normalize(keras_refs).T
    scores = l2_normalize(queries) @ l2_normalize(refs).T
    error = np.abs(scores - keras_scores)
    flipped = (scores >= DEFAULT_THRESHOLD) != (keras_scores >= DEFAULT_THRESHOLD)
    return {
        "references": len(references), "reference_mean_cosine": float(cos.mean()),
        "reference_worst_cosine": float(cos.min()), "score_error_mean": float(error.mean()),
        "score_error_p99": float(np.quantile(error, 0.99)), "score_error_max": float(error.max()),
        "decisions_flipped": int(flipped.sum()), "decision_pairs": int(flipped.size),
        "flip_threshold": DEFAULT_THRESHOLD,
    }


def _quant_params(detail: dict) -> tuple[float, int]:
    scale, zero = detail.get("quantization", (0.0, 0))
    return float(scale), int(zero)


def run_tflite(model_content: bytes, images: np.ndarray, num_threads: int = 1) -> np.ndarray:
    """Raw (dequantized) latents of uint8 ``images`` (N, S, S, 3), computed by the device's
    own encoder wrapper, so the drift check measures exactly what a phone will run."""
    from auditlens.device_app.interpreter import Encoder, EncoderOptions

    return Encoder(model_content, EncoderOptions(num_threads=num_threads)).raw_latents(images)


def median_latency_ms(model_content: bytes, image: np.ndarray, runs: int = 200) -> float:
    """Median single-image invoke time on one thread (after a warm-up)."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=model_content, num_threads=1)
    interpreter.allocate_tensors()
    inp = interpreter.get_input_details()[0]
    x = image[None].astype(inp["dtype"]) if inp["dtype"] != np.int8 else (image[None].astype(np.int16) - 128).astype(np.int8)
    interpreter.set_tensor(inp["index"], x)
    for _ in range(20):
        interpreter.invoke()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        interpreter.invoke()
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1000)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of two latent matrices."""
    return np.sum(l2_normalize(a) * l2_normalize(b), axis=1)


def _similarities(latents: np.ndarray) -> np.ndarray:
    z = l2_normalize(latents)
    return z @ z.T


CELLS_SOURCE_LAYER = "head_relu"
"""The encoder's last feature map, which average pooling and the ``latent`` Dense layer
turn into the latent (:func:`auditlens.training.model.build_encoder`)."""


def with_cells(encoder):
    """The encoder with a second output: its last feature map's cells, each projected by
    the latent layer's kernel (no bias), so that they average (plus the bias) to the
    latent (:mod:`auditlens.device_app.cells`). Refused for an encoder that does not pool
    its feature map straight into the latent."""
    import keras

    try:
        fmap = encoder.get_layer(CELLS_SOURCE_LAYER).output
        dense = encoder.get_layer("latent")
    except ValueError:
        raise ModelError(f"{encoder.name}: --cells needs an encoder with a '{CELLS_SOURCE_LAYER}' feature "
                         "map and a 'latent' Dense layer, as auditlens train builds them") from None
    kernel = dense.get_weights()[0]
    pool = next((layer for layer in encoder.layers if layer.name == "pool"), None)
    averaged = isinstance(pool, keras.layers.GlobalAveragePooling2D) and pool.input is fmap
    if not averaged or len(fmap.shape) != 4 or kernel.shape[0] != fmap.shape[-1]:
        raise ModelError(f"{encoder.name}: --cells needs the '{CELLS_SOURCE_LAYER}' feature map "
                         f"({fmap.shape}) pooled straight into the latent (kernel {kernel.shape}); "
                         "this encoder pools otherwise")
    project = keras.layers.Dense(kernel.shape[1], use_bias=False, name="cells")
    cells = project(fmap)
    project.set_weights([kernel])
    return keras.Model(encoder.input, [encoder.output, cells], name=f"{encoder.name}_cells")


def _cells_agreement(two, content: bytes, images: np.ndarray) -> tuple[int, float]:
    """The TFLite model's cells an image, and their mean cosine on ``images`` to those of
    ``two``, the Keras encoder with its cells output (:func:`with_cells`)."""
    keras_cells = np.concatenate([np.asarray(two(images[i:i + 64].astype(np.float32), training=False)[1])
                                  for i in range(0, len(images), 64)])
    cells = Encoder(content).embed_with_cells(images)[1]
    keras_cells = l2_normalize(keras_cells.reshape(cells.shape))
    return cells.shape[1], float(np.sum(cells * keras_cells, axis=-1).mean())


def load_keras_encoder(model):
    """A Keras model, or the path of a ``.keras`` file."""
    if isinstance(model, (str, Path)):
        import keras

        path = Path(model)
        if path.is_dir():
            inside = [p for p in sorted(path.glob("*.keras")) if p.name != "autoencoder.keras"]  # not an encoder
            inside += sorted(path.glob("checkpoints/*.keras"))[-1:]
            raise ModelError(f"{path} is a folder: export a .keras file"
                             + (f", e.g. {' or '.join(map(str, inside))}" if inside else " (none is inside it)"))
        if not path.is_file():
            raise ModelError(f"{path}: no such Keras model file")
        try:
            model = keras.models.load_model(path, compile=False)
        except Exception as exc:
            raise ModelError(f"{path}: not a Keras model auditlens can read (export the encoder.keras "
                             f"that auditlens train wrote): {exc}") from exc
    inputs, outputs = tuple(model.input_shape), tuple(model.output_shape)
    if len(inputs) != 4 or inputs[-1] != 3 or len(outputs) != 2:
        raise ModelError(
            f"{getattr(model, 'name', 'model')}: takes {inputs} and gives {outputs}, not an image "
            "encoder ((N, S, S, 3) in, (N, D) latents out); export the run's encoder.keras, not "
            "autoencoder.keras")
    return model


def export_encoder(
    model,
    representative_images: np.ndarray,
    out_path: str | Path,
    config: QuantizationConfig | None = None,
    compare_images: np.ndarray | None = None,
    references: np.ndarray | None = None,
    cells: bool = False,
) -> ExportReport:
    """Convert ``model`` as ``config`` says, write it to ``out_path`` and check its drift.

    Args:
        model: a Keras encoder or the path of its ``.keras`` file.
        representative_images: uint8 (N, S, S, 3) images preprocessed like on the device;
            they calibrate int8 and are the images latents are compared on.
        out_path: where the ``.tflite`` goes (written only if the drift check passes).
        config: the quantization; default full int8 calibrated on the representative images.
        compare_images: compare on these instead of the representative images.
        references: the catalogue's originals as the device embeds them: their own drift
            is held to the same worst cosine, and the score of each compared image against
            each of them is checked against the Keras score.
        cells: also give the feature map's cells (:func:`with_cells`); the drift checks
            stay on the latent, the cells' agreement is reported.

    Raises:
        ModelError: conversion failed, or the TFLite latents drift from the Keras ones
            beyond the config's thresholds.
    """
    encoder = load_keras_encoder(model)
    rep = np.asarray(representative_images)
    if rep.dtype != np.uint8 or rep.ndim != 4:
        raise ValueError(f"representative images must be uint8 (N, S, S, 3), got {rep.dtype} {rep.shape}")
    expected = tuple(encoder.input_shape[1:])
    if rep.shape[1:] != expected:
        raise ModelError(f"representative images are {rep.shape[1:]}, the encoder takes {expected}")
    config = config or QuantizationConfig.for_int8(rep)
    if compare_images is None or not len(compare_images):
        compare = rep
        compared_on = ("representative images" if config.representative is None
                       else "calibration images (the ones it was calibrated on)")
    else:
        compare = np.asarray(compare_images, np.uint8)
        compared_on = ("images beyond the representative set" if config.representative is None
                       else "images outside the calibration set")
    if len(compare) > MAX_COMPARE_IMAGES:  # evenly spread: the pairwise check is quadratic
        compare = compare[spread_indices(len(compare), MAX_COMPARE_IMAGES)]

    t = time.perf_counter()
    two = with_cells(encoder) if cells else None
    content = convert(encoder if two is None else two, config)
    convert_seconds = time.perf_counter() - t

    keras_latents, latents = _both_latents(encoder, content, compare)
    cos = cosine_rows(latents, keras_latents)
    pair_errors = None
    if len(compare) > 1:
        sim_error = np.abs(_similarities(latents) - _similarities(keras_latents))
        pair_errors = sim_error[~np.eye(len(compare), dtype=bool)]
    checked = _reference_check(encoder, content, references, keras_latents, latents)

    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=content)
    inp = interpreter.get_input_details()[0]
    out = next(o for o in interpreter.get_output_details() if len(o["shape"]) == 2)  # the latent
    report = ExportReport(
        out_path=str(out_path), mode=config.mode, size_bytes=len(content), n_images=len(compare),
        mean_cosine=float(cos.mean()), worst_cosine=float(cos.min()),
        min_worst_cosine=config.min_worst_cosine,
        similarity_mae=None if pair_errors is None else float(pair_errors.mean()),
        similarity_max_error=None if pair_errors is None else float(pair_errors.max()),
        input_dtype=np.dtype(inp["dtype"]).name, output_dtype=np.dtype(out["dtype"]).name,
        input_shape=[int(v) for v in inp["shape"]], latent_dim=int(out["shape"][-1]),
        input_quantization=_quant_params(inp), output_quantization=_quant_params(out),
        latency_ms_median=median_latency_ms(content, compare[0]),
        convert_seconds=round(convert_seconds, 2), float_ops=config.float_ops,
        compared_on=compared_on, cross_cosine=_cross_cosine(keras_latents), **checked,
        **(dict(zip(("cells", "cells_mean_cosine"), _cells_agreement(two, content, compare)))
           if two is not None else {}),
    )
    if report.references and report.reference_worst_cosine < config.min_worst_cosine:
        raise ModelError(
            f"{config.mode} model drifts from the Keras encoder on the catalogue's originals (the "
            f"references every photo is scored against): worst cosine {report.reference_worst_cosine:.4f} "
            f"(need >= {config.min_worst_cosine}), mean {report.reference_mean_cosine:.4f} over "
            f"{report.references}; scores against them move by up to {report.score_error_max:.3f}. "
            "Keep the first ops in float (--float-ops 6; for the mobilenet_v2 trunk's stem and first "
            "block), use --float16, or export again with a lower --min-worst-cosine and measure what "
            "the drift costs before shipping it (auditlens enroll and evaluate with that model)")
    if report.worst_cosine < config.min_worst_cosine or report.mean_cosine < config.min_mean_cosine:
        raise ModelError(
            f"{config.mode} model drifts from the Keras encoder: mean cosine {report.mean_cosine:.4f} "
            f"(need >= {config.min_mean_cosine}), worst {report.worst_cosine:.4f} (need >= "
            f"{config.min_worst_cosine}) on {report.n_images} {compared_on}; check the representative "
            "images (they must be preprocessed like the device's inputs), keep the first ops in "
            "float (--float-ops 6) or use --float16"
            + (", or export again with a lower --min-worst-cosine and measure what the drift costs "
               "before shipping it (auditlens enroll and evaluate with that model)"
               if report.mean_cosine >= config.min_mean_cosine else
               " (the mean is below its floor: --min-worst-cosine does not relax it)")
        )
    with atomic_write(out_path, binary=True) as fh:  # an old model stays whole until replaced
        fh.write(content)
    return report


# -- representative images ----------------------------------------------------------------
def representative_images(
    catalog_source: str, spec: PreprocessSpec, photos_csv: str | None = None, max_photos: int = 300,
    progress: Callable[[str], None] | None = None, exclude: set[str] = frozenset(),
) -> tuple[np.ndarray, int]:
    """Originals of the catalogue plus up to ``max_photos`` evenly spread labelled photos,
    each through ``load_image`` + ``to_model_input`` exactly as the device sees them; and
    how many of them (the first) are originals. Products in ``exclude`` (held out of
    training) give neither originals nor photos."""
    originals = [p.image for p in open_catalog(catalog_source) if p.product_id not in exclude]
    if not originals:
        raise CatalogError(f"{catalog_source}: no original left to calibrate with once the "
                           f"{len(exclude)} excluded products are left out")
    if len(originals) > MAX_REPRESENTATIVE_ORIGINALS:  # never more are used: decode only those
        originals = [originals[i] for i in spread_indices(len(originals), MAX_REPRESENTATIVE_ORIGINALS)]
    sources = originals + [p.photo for p in _split_photos(_photos(photos_csv, exclude), max_photos)[0]]
    if progress:
        progress(f"loading {len(sources)} representative images ...")
    try:
        return stack_inputs(sources, spec), len(originals)
    except AuditlensError as exc:
        raise CatalogError(f"representative image: {exc}") from exc


def _calibration_warnings(calibrating: int, originals: int, compare) -> list[str]:
    """What makes an int8 export's calibration or drift check weak, in words."""
    notes = []
    if calibrating < FEW_CALIBRATION_IMAGES:
        notes.append(f"int8 is calibrated on only {calibrating} images ({originals} originals"
                     f"{'' if calibrating > originals else ', no field photos'}): ranges fitted to so "
                     f"few may clip on field photos; give --photos with at least "
                     f"{FEW_CALIBRATION_IMAGES} field photos")
    elif calibrating == originals:
        notes.append("int8 is calibrated on the studio originals alone (no --photos): the device "
                     "mostly embeds field photos; give --photos")
    if compare is None:
        notes.append("the drift check runs on the images int8 was calibrated on, its most lenient "
                     f"case: give --photos with at least {MIN_COMPARE_PHOTOS} more field photos "
                     "than --max-photos calibrates on, so it runs on images int8 was not fitted to")
    return notes


def _photos(photos_csv: str | None, exclude: set[str] = frozenset()) -> list:
    if not photos_csv:
        return []
    return [p for p in read_labelled_photos(photos_csv) if p.product_id not in exclude]


def _split_photos(photos: list, max_photos: int) -> tuple[list, list]:
    """(the photos that calibrate: at most ``max_photos``, evenly spread; the rest)."""
    if len(photos) <= max_photos:
        return list(photos), []
    used = set(spread_indices(len(photos), max_photos).tolist())
    return ([p for i, p in enumerate(photos) if i in used],
            [p for i, p in enumerate(photos) if i not in used])


def comparison_photos(photos_csv: str | None, spec: PreprocessSpec, max_photos: int = 300,
                      count: int = COMPARE_PHOTOS, least: int = MIN_COMPARE_PHOTOS,
                      exclude: set[str] = frozenset()) -> np.ndarray | None:
    """Up to ``count`` field photos that :func:`representative_images` leaves out of the
    calibration set (evenly spread), to measure the drift on images the int8 ranges were
    not fitted to; None when fewer than ``least`` are left over."""
    spare = _split_photos(_photos(photos_csv, exclude), max_photos)[1]
    if len(spare) < max(least, 1):
        return None
    if len(spare) > count:
        spare = [spare[i] for i in spread_indices(len(spare), count)]
    try:
        return stack_inputs([p.photo for p in spare], spec)
    except AuditlensError as exc:
        raise CatalogError(f"comparison photo: {exc}") from exc


# -- CLI -------------------------------------------------------------------------------------
def add_export_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``auditlens export``."""
    parser.description = (
        "Convert a trained Keras encoder (encoder.keras) to TFLite: full int8 by default "
        "(uint8 pixels in, int8 latent out), or --float16 / --dynamic / --float32. Prints the drift of its "
        "latents against the Keras ones and writes the model card (report + preprocessing) next to it: --out enc.tflite gives enc.json."
    )
    parser.add_argument("model", help="Keras encoder (.keras) written by 'auditlens train'")
    parser.add_argument("--representative", required=True, metavar="CATALOG",
                        help="catalogue whose originals calibrate the model and are checked as the "
                             "device's references")
    parser.add_argument("--photos", help="photo,product_id CSV: field photos to add to the representative set")
    parser.add_argument("--max-photos", type=non_negative_int, default=300,
                        help="photos used at most (default 300; 0: the originals alone)")
    parser.add_argument("--exclude-products", metavar="IDS",
                        help="products held out of training, whose originals and photos must not "
                             "calibrate the model (a measurement on them would rest on ranges fitted "
                             "to its own test images): one id per line, a JSON list, or the training "
                             "run's report.json")
    parser.add_argument("--out", required=True, help="output .tflite path")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--float16", action="store_true", help="float16 weights instead of full int8")
    mode.add_argument("--dynamic", action="store_true", help="dynamic-range int8 weights, float activations")
    mode.add_argument("--float32", action="store_true",
                      help="no quantization: the Keras model as TFLite, to evaluate what int8 costs")
    parser.add_argument("--float-ops", type=non_negative_int, default=0, metavar="N",
                        help="int8: keep the graph's first N ops in float, float32 in and out "
                             "(6: input normalisation, stem and block 1 of the mobilenet_v2 trunk; "
                             "docs/ablation.md) (default 0: full int8)")
    parser.add_argument("--cells", action="store_true",
                        help="also give the last feature map's cells (8 x 8 at 128 px), which bundles "
                             "keep beside the latents and `calibrate` weighs into the score; measured "
                             "to help products added after training (docs/ablation.md)")
    parser.add_argument("--crop", choices=("center", "full"), default=None,
                        help="preprocessing crop the model was trained with (default: the one in the "
                        "training run's report.json beside the model, else center); a crop the run's "
                        "report contradicts is refused")
    parser.add_argument("--min-worst-cosine", type=cosine_threshold,
                        help="fail if any image's cosine to the Keras latent is below this "
                             f"(default int8 {INT8_MIN_WORST_COSINE}, dynamic {DYNAMIC_MIN_WORST_COSINE}, "
                             f"float16 {FLOAT16_MIN_WORST_COSINE}, float32 {FLOAT32_MIN_WORST_COSINE}); "
                             "measured on the originals and on field photos kept out of the int8 "
                             f"calibration when --photos has at least {MIN_COMPARE_PHOTOS} more than "
                             "--max-photos, else on the calibration images. int8 also needs a mean "
                             f"cosine of {INT8_MIN_MEAN_COSINE} on those photos, which this does not relax")
    return parser


def training_report(model_path: str | os.PathLike) -> dict | None:
    """The report.json of the training run (or soup) that saved ``model_path``
    (``RUN/encoder.keras`` or ``RUN/checkpoints/encoder_epoch_NNN.keras``); None when there
    is none to read."""
    model_path = Path(model_path)
    for path in (model_path.parent / "report.json", model_path.parent.parent / "report.json"):
        try:
            report = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(report, dict) and isinstance(report.get("preprocess"), dict):
            return report
    return None


def trained_crop(model_path: str | os.PathLike) -> str | None:
    """The preprocessing crop in the report of the run that saved ``model_path``."""
    crop = (training_report(model_path) or {}).get("preprocess", {}).get("crop")
    return None if crop is None else str(crop)


def run_export(args: argparse.Namespace) -> int:
    """``auditlens export``: returns the process exit code."""
    try:
        if Path(args.out).suffix.lower() != ".tflite":
            # the model card goes beside it as OUT with .json: OUT.json would overwrite the model
            raise ModelError(f"--out {args.out}: name the model file NAME.tflite "
                             "(its model card is written beside it as NAME.json)")
        if args.float_ops and (args.float16 or args.dynamic or args.float32):
            raise ValueError("--float-ops applies to the int8 export only")
        for path in (Path(args.out), Path(args.out).with_suffix(".json")):
            check_output_file(path, inputs=(args.model,), make_folder=True)
        trained = trained_crop(args.model)
        if args.crop and trained and args.crop != trained:
            raise ModelError(f"--crop {args.crop}: the training run's report.json says this model "
                             f"was trained with crop {trained!r}; its photos would be cut differently")
        encoder = load_keras_encoder(args.model)
        spec = PreprocessSpec(input_size=int(encoder.input_shape[1]),
                              crop=args.crop or trained or "center")
        exclude = read_product_ids(args.exclude_products) if args.exclude_products else set()
        if exclude:  # a typo would silently calibrate on the product it meant to leave out
            unknown = sorted(exclude - {p.product_id for p in open_catalog(args.representative)})
            if unknown:
                print(f"auditlens: warning: --exclude-products names {len(unknown)} id(s) the "
                      f"catalogue does not hold, which exclude nothing: {', '.join(map(repr, unknown[:5]))}"
                      + (" ..." if len(unknown) > 5 else ""), file=sys.stderr)
                exclude -= set(unknown)
        rep, originals = representative_images(args.representative, spec, args.photos, args.max_photos,
                                               progress=lambda m: print(m, file=sys.stderr), exclude=exclude)
        if args.float16:
            config = QuantizationConfig.for_float16()
        elif args.dynamic:
            config = QuantizationConfig.for_dynamic()
        elif args.float32:
            config = QuantizationConfig.for_float32()
        else:
            config = QuantizationConfig.for_int8(calibration_images(rep, originals), float_ops=args.float_ops)
        if args.min_worst_cosine is not None:
            config = QuantizationConfig(config.mode, config.representative, config.input_type,
                                        config.output_type, args.min_worst_cosine, config.min_mean_cosine,
                                        config.float_ops)
        compare = comparison_photos(args.photos, spec, args.max_photos, exclude=exclude)
        if config.representative is not None:
            for note in _calibration_warnings(len(config.representative), originals, compare):
                print(f"auditlens: warning: {note}", file=sys.stderr)
        report = export_encoder(encoder, rep, args.out, config, compare_images=compare,
                                references=rep[:originals], cells=args.cells)
    except (AuditlensError, ValueError) as exc:
        print(f"auditlens: error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    card = {
        "model_id": model_id_of(out.read_bytes()),  # the card's own model, wherever it is copied
        "preprocess": spec.to_dict(),
        "export": report.to_dict(),
        "source_model": str(args.model),  # as given on the command line, not resolved
        "representative": {"catalog": str(args.representative), "photos": args.photos,
                           "excluded_products": sorted(exclude), "n_images": len(rep),
                           "originals": originals,  # at most MAX_REPRESENTATIVE_ORIGINALS
                           # int8 calibrates on up to MAX_CALIBRATION_IMAGES of the n_images
                           "calibration_images": (None if config.representative is None
                                                  else len(config.representative))},
    }
    card_path = out.with_suffix(".json")
    with atomic_write(card_path) as fh:
        json.dump(card, fh, indent=2)
    print(f"wrote {out} ({report.mode}, {report.size_bytes / 1024:.1f} KiB, "
          f"{report.input_dtype} in -> {report.output_dtype} out, {report.latency_ms_median:.3f} ms/image 1 thread)")
    pairwise = ("" if report.similarity_mae is None else
                f"; pairwise similarity error mean {report.similarity_mae:.4f}, max {report.similarity_max_error:.4f}")
    print(f"drift vs Keras on {report.n_images} {report.compared_on}: mean cosine {report.mean_cosine:.4f}, "
          f"worst {report.worst_cosine:.4f}{pairwise}")
    if report.references:
        print(f"drift vs Keras on the {report.references} originals (the references): mean cosine "
              f"{report.reference_mean_cosine:.4f}, worst {report.reference_worst_cosine:.4f}; score against "
              f"them moves by {report.score_error_mean:.4f} on average, {report.score_error_p99:.4f} at the "
              f"99th percentile, {report.score_error_max:.4f} at most; {report.decisions_flipped} of "
              f"{report.decision_pairs} pairs change side of the default threshold {report.flip_threshold}")
    if report.cells:
        print(f"cells: {report.cells} an image, mean cosine {report.cells_mean_cosine:.4f} to the Keras ones")
    print(f"model card: {card_path}")
    note = collapse_note(report)
    if note:
        print(f"auditlens: warning: {note}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = add_export_arguments(argparse.ArgumentParser(prog="auditlens export"))
    return run_export(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
