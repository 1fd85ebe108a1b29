"""A float32 TFLite copy of the Keras encoder, for the int8-vs-float32 inference timing.

Converted in a child process (TensorFlow is heavy and never belongs in the measured
process). Returns None with a reason when TensorFlow or the Keras model is missing.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

_SCRIPT = r"""
import sys, keras, tensorflow as tf
model = keras.models.load_model(sys.argv[1], compile=False)
converter = tf.lite.TFLiteConverter.from_keras_model(model)  # no optimizations: float32
open(sys.argv[2], "wb").write(converter.convert())
"""


def export_float32(keras_path: Path, out: Path, timeout: float = 300) -> tuple[Path | None, str]:
    """(path of the float32 .tflite or None, note)."""
    if not Path(keras_path).is_file():
        from .common import rel

        return None, f"float32 skipped: no Keras model at {rel(keras_path)}"
    try:
        import importlib.util

        if importlib.util.find_spec("tensorflow") is None:
            return None, "float32 skipped: TensorFlow is not installed"
    except (ImportError, ValueError):
        return None, "float32 skipped: TensorFlow is not installed"
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, str(keras_path), str(out)],
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not out.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        return None, f"float32 skipped: conversion failed: {tail[0][:300]}"
    from .common import rel

    return out, f"float32 converted from {rel(keras_path)} with TensorFlow (no quantization)"
