"""The encoder on the device: a TFLite model run by the LiteRT interpreter.

The interpreter is reached through :func:`load_interpreter` only, so moving to another
runtime (python-for-android's ``tflite-runtime`` recipe, or the Java LiteRT library
through pyjnius) means swapping that one adapter. Quantized inputs and outputs are
(de)quantized here with the model's own scale and zero point, and latents are
L2-normalised in numpy (the normalisation is kept out of the int8 graph on purpose).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from auditlens.errors import ModelError

_DELEGATE_NOTICE = b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU."
_STDERR_LOCK = threading.Lock()
_drop_notice = False


def drop_runtime_notice(enabled: bool = True) -> None:
    """Filter LiteRT's delegate notice out of stderr whenever an :class:`Encoder` is made
    (:func:`without_delegate_notice`). Off by default: the filter points the process's
    file descriptor 2 elsewhere for a moment, which a service's other threads and child
    processes would feel. ``auditlens``'s command line and the field app, whose processes
    are their own, turn it on."""
    global _drop_notice
    _drop_notice = bool(enabled)


def runtime_notices_dropped() -> bool:
    """Whether :func:`drop_runtime_notice` turned the filtering on (this process is the
    caller's own: the command line, the field app)."""
    return _drop_notice


@contextlib.contextmanager
def without_stderr_lines(drop: Callable[[bytes], bool]):
    """Drop the lines for which ``drop`` is true from what the process writes to its
    stderr meanwhile, from C++ as well as from Python.

    Runtimes print notices from C++ that no Python setting silences, and on a command
    line they read like part of the result. File descriptor 2 is pointed at a temporary
    file for the duration, and every other line written there meanwhile (by any thread)
    is passed on afterwards. Where the descriptor cannot be swapped, nothing is filtered."""
    with _STDERR_LOCK:
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError, AttributeError):
            saved = None
        if saved is None:
            yield
            return
        with tempfile.TemporaryFile() as captured:
            try:
                os.dup2(captured.fileno(), 2)
                yield
            finally:
                with contextlib.suppress(OSError, ValueError, AttributeError):
                    sys.stderr.flush()  # Python's buffered lines belong to the window too
                os.dup2(saved, 2)
                os.close(saved)
                captured.seek(0)
                kept = [line for line in captured.read().splitlines(keepends=True) if not drop(line)]
                if kept:
                    os.write(2, b"".join(kept))


def without_delegate_notice():
    """Drop LiteRT's "Created ... XNNPACK delegate" line, which the runtime prints when
    the first interpreter allocates its tensors (:func:`without_stderr_lines`)."""
    return without_stderr_lines(lambda line: line.startswith(_DELEGATE_NOTICE))


def load_interpreter(model_content: bytes, num_threads: int = 1, source: str | os.PathLike | None = None):
    """Create a TFLite interpreter from the model bytes with the best runtime available:
    ``ai_edge_litert`` (LiteRT), else ``tflite_runtime``. Never TensorFlow's own, so that the
    engine runs where TensorFlow is not installed and never loads it where it is."""
    errors = []
    for module, attr in (
        ("ai_edge_litert.interpreter", "Interpreter"),
        ("tflite_runtime.interpreter", "Interpreter"),
    ):
        try:
            cls = getattr(__import__(module, fromlist=[attr]), attr)
        except ImportError as exc:
            errors.append(f"{module}: {exc}")
            continue
        try:
            return cls(model_content=model_content, num_threads=num_threads)
        except (ValueError, RuntimeError) as exc:
            raise ModelError(f"{source or 'the model file'}: not a valid TFLite model: {exc}") from exc
    raise ModelError(
        "no TFLite interpreter is installed; `pip install ai-edge-litert` "
        "(tried: " + "; ".join(errors) + ")"
    )


def model_id_of(model_content: bytes) -> str:
    """Stable id of a model: the first 16 hex digits of its sha256."""
    return hashlib.sha256(model_content).hexdigest()[:16]


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """Scale each row to unit length (rows of zeros stay zero)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


@dataclass(frozen=True)
class EncoderOptions:
    """How to run the encoder."""

    num_threads: int = 1
    """CPU threads for the interpreter; 1 keeps the UI thread and the camera responsive."""


def _is_keras_zip(content: bytes) -> bool:
    """Whether zip bytes are a Keras 3 ``.keras`` model (its config.json and weights)."""
    import zipfile

    try:
        with zipfile.ZipFile(io.BytesIO(content)) as zf:
            return {"config.json", "model.weights.h5"} <= set(zf.namelist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return False


class Encoder:
    """Runs a TFLite image encoder: uint8 images (N, S, S, 3) in, unit latents (N, D) out
    (and, from a model exported with cells, unit feature-map cells (N, C, D): :mod:`.cells`).

    Safe to share between threads: one interpreter runs one batch at a time (callers
    queue on a lock); for parallel inference, give each thread its own Encoder."""

    def __init__(self, model: str | os.PathLike | bytes, options: EncoderOptions | None = None, *,
                 source: str | os.PathLike | None = None):
        """``source``: the file ``model``'s bytes came from, for messages (a path names itself)."""
        self.options = options or EncoderOptions()
        if isinstance(model, (bytes, bytearray)):
            content = bytes(model)
            self.path: Path | None = None
        else:
            self.path = Path(model)
            try:
                content = self.path.read_bytes()
            except OSError as exc:
                raise ModelError(f"{self.path}: cannot read the model file: {exc}") from exc
        self.model_id = model_id_of(content)
        source = self.path or source
        if content[:4] == b"PK\x03\x04":  # a zip: a Keras model, or a bundle, not TFLite
            raise ModelError(f"{source or 'the model'} is a zip archive, not a TFLite model"
                             + (": a Keras model; export it first (auditlens export MODEL.keras "
                                "--representative CATALOG --out encoder.tflite) and give the .tflite"
                                if _is_keras_zip(content) else ""))
        with without_delegate_notice() if _drop_notice else contextlib.nullcontext():
            self._interpreter = load_interpreter(content, self.options.num_threads, source=source)
            self._interpreter.allocate_tensors()
        self._lock = threading.Lock()
        self._batch = 1
        inputs = self._interpreter.get_input_details()
        if len(inputs) != 1:
            raise ModelError(f"an encoder has one input, this model has {len(inputs)}")
        self._input = inputs[0]
        self._output, self._cells = self._outputs()
        shape = tuple(int(s) for s in self._input["shape"])
        if len(shape) != 4 or shape[1] != shape[2] or shape[3] != 3:
            raise ModelError(f"expected an encoder input of shape (1, S, S, 3), got {shape}")
        self.input_size = shape[1]
        self.latent_dim = int(self._output["shape"][-1])
        self.cell_count = 0 if self._cells is None else int(np.prod(self._cells["shape"][1:-1]))
        """Feature-map cells per image of a model exported with cells (:mod:`.cells`), else 0."""

    def _outputs(self) -> tuple[dict, dict | None]:
        """The latent's output detail, and the cells' (None for a latent-only model)."""
        outputs = self._interpreter.get_output_details()
        latent = [o for o in outputs if len(o["shape"]) == 2]
        cells = [o for o in outputs if len(o["shape"]) == 4]
        if len(outputs) == 1 and len(latent) == 1:
            return latent[0], None
        if (len(outputs) == 2 and len(latent) == 1 and len(cells) == 1
                and int(cells[0]["shape"][-1]) == int(latent[0]["shape"][-1])):
            return latent[0], cells[0]
        raise ModelError("an encoder gives a latent (1, D), and with cells also a feature map "
                         f"(1, H, W, D); this model gives {[tuple(map(int, o['shape'])) for o in outputs]}")

    @property
    def has_cells(self) -> bool:
        """Whether the model also gives its feature-map cells (``export --cells``)."""
        return self._cells is not None

    @property
    def input_dtype(self) -> np.dtype:
        return np.dtype(self._input["dtype"])

    def _quantize_input(self, images: np.ndarray) -> np.ndarray:
        dtype = self.input_dtype
        if dtype == np.float32:
            return images.astype(np.float32)
        scale, zero = self._input["quantization"]
        if dtype == np.uint8 and scale == 1.0 and zero == 0:
            return images  # the common uint8 case: no arithmetic at all
        info = np.iinfo(dtype)
        q = np.round(images.astype(np.float32) / scale) + zero
        return np.clip(q, info.min, info.max).astype(dtype)

    @staticmethod
    def _dequantize(raw: np.ndarray, detail: dict) -> np.ndarray:
        if raw.dtype == np.float32:
            return raw
        scale, zero = detail["quantization"]
        return (raw.astype(np.float32) - zero) * scale

    def _resize(self, batch: int) -> None:
        if batch != self._batch:
            self._interpreter.resize_tensor_input(self._input["index"], [batch, self.input_size, self.input_size, 3])
            self._interpreter.allocate_tensors()
            self._input = self._interpreter.get_input_details()[0]
            self._output, self._cells = self._outputs()
            self._batch = batch

    def raw_latents(self, images: np.ndarray, batch_size: int = 1) -> np.ndarray:
        """Latents before normalisation, float32 (N, D)."""
        return self._run(images, batch_size, with_cells=False)[0]

    def embed_with_cells(self, images: np.ndarray, batch_size: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Unit latents (N, D) and unit cells (N, C, D) of a model exported with cells."""
        if self._cells is None:
            raise ModelError("this model has no cells output; export it with --cells")
        latents, cells = self._run(images, batch_size, with_cells=True)
        return l2_normalize(latents), l2_normalize(cells)

    def _run(self, images: np.ndarray, batch_size: int, with_cells: bool) -> tuple[np.ndarray, np.ndarray | None]:
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[None]
        if images.shape[1:] != (self.input_size, self.input_size, 3):
            raise ModelError(f"images of shape {images.shape[1:]} do not fit the encoder's "
                             f"input ({self.input_size}, {self.input_size}, 3)")
        out = np.empty((len(images), self.latent_dim), dtype=np.float32)
        cells = np.empty((len(images), self.cell_count, self.latent_dim), np.float32) if with_cells else None
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            with self._lock:  # resize, set, invoke and read belong together
                self._resize(len(chunk))
                self._interpreter.set_tensor(self._input["index"], self._quantize_input(chunk))
                self._interpreter.invoke()
                out[start:start + len(chunk)] = self._dequantize(
                    self._interpreter.get_tensor(self._output["index"]), self._output)
                if with_cells:
                    raw = self._dequantize(self._interpreter.get_tensor(self._cells["index"]), self._cells)
                    cells[start:start + len(chunk)] = raw.reshape(len(chunk), self.cell_count, self.latent_dim)
        return out, cells

    def embed(self, images: np.ndarray, batch_size: int = 1) -> np.ndarray:
        """Unit-length latents, float32 (N, D); one uint8 image (S, S, 3) gives (1, D)."""
        return l2_normalize(self.raw_latents(images, batch_size))
