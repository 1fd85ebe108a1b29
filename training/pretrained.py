"""An ImageNet-trained MobileNetV2 trunk as the encoder's starting point, read without torch.

A network trained on 61 products from scratch memorises them and carries little that helps
a product enrolled after training; ImageNet features carry what a small catalogue cannot
teach (docs/ablation.md). The encoder can therefore start from the first blocks of
torchvision's ImageNet MobileNetV2 (``--backbone mobilenet_v2``): the blocks up to the
96-channel stage hold about half a million parameters, so the int8 encoder stays under
1 MB, and fine-tuning with the metric objective adapts them to the catalogue.

torchvision ships that network as ``mobilenet_v2-b0353104.pth``, a pickled state dict.
:func:`read_torch_state_dict` reads such a file (the legacy format and the zip format)
with numpy alone, through an unpickler that builds nothing but tensors, ordered dicts and
plain values, so neither torch nor its arbitrary-code unpickling is needed. The file is
never fetched: the engineer passes its path (``--backbone-weights``).

The Keras layers below follow torchvision's layout exactly (symmetric padding of strided
3x3 convolutions, BatchNorm epsilon 1e-5), so the weights load unchanged.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np

from auditlens.errors import AuditlensError
from auditlens.files import file_sha256

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# (expansion, output channels, repeats, first stride) of torchvision's MobileNetV2;
# ``features.1`` is the first block, ``features.17`` the last, ``features.18`` the 1x1 head.
MOBILENET_V2_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                         (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
DEFAULT_TRUNK_BLOCKS = 13
"""Blocks kept (``features.1`` to ``features.13``): up to the 96-channel stage, stride 16."""

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class _StorageType:
    def __init__(self, name: str):
        if name not in _STORAGE_DTYPES:
            raise AuditlensError(f"unsupported tensor storage {name!r} in the weights file")
        self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _TensorRef:
    """A tensor named by the unpickler, made an array once its storage's bytes are read."""

    def __init__(self, storage, offset, size, stride, *_ignored):
        self.key, self.dtype = storage
        self.offset, self.size, self.stride = int(offset), tuple(size), tuple(stride)

    def materialise(self, storage: np.ndarray) -> np.ndarray:
        last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride) if n > 0)
        if storage.size <= last:
            raise AuditlensError("the weights file is truncated: a tensor runs past its storage")
        return np.lib.stride_tricks.as_strided(
            storage[self.offset:], shape=self.size,
            strides=tuple(s * self.dtype.itemsize for s in self.stride)).copy()


class _TensorUnpickler(pickle.Unpickler):
    """Unpickles a state dict into :class:`_TensorRef` values; refuses every other global."""

    def find_class(self, module, name):
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
            return _TensorRef
        if module == "torch" and name.endswith("Storage"):
            return _StorageType(name)
        raise AuditlensError(f"the weights file holds {module}.{name}, not only tensors: refused")

    def persistent_load(self, pid):
        # ('storage', storage type, key, location, number of elements[, view])
        if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage":
            raise AuditlensError(f"unexpected reference {pid!r} in the weights file")
        return str(pid[2]), pid[1].dtype


def _materialise(state, fetch) -> dict[str, np.ndarray]:
    if not isinstance(state, dict):
        raise AuditlensError("the weights file does not hold a state dict")
    out = {}
    for name, value in state.items():
        if isinstance(value, _TensorRef):
            out[str(name)] = value.materialise(fetch(value.key, value.dtype))
    return out


def check_hash_in_name(path: Path) -> None:
    """torchvision names its weight files ``NAME-HASH.pth``, HASH being the first hex digits
    of the file's sha256 (``mobilenet_v2-b0353104.pth``): a file so named must hash to them,
    or it is damaged or another file under the name."""
    match = re.fullmatch(r".+-([0-9a-f]{8,64})\.pth", path.name)
    if match is None:
        return
    digest = file_sha256(path)
    if not digest.startswith(match.group(1)):
        raise AuditlensError(f"{path}: its sha256 begins {digest[:len(match.group(1))]}, not "
                             f"{match.group(1)} as its name says: a damaged copy or another file")


def read_torch_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Parameter name -> array, from a torch ``state_dict`` file (legacy or zip format)."""
    path = Path(path)
    if not path.is_file():
        raise AuditlensError(f"weights file not found: {path}")
    check_hash_in_name(path)
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                pkl = next((n for n in archive.namelist() if n.rsplit("/", 1)[-1] == "data.pkl"), None)
                if pkl is None:
                    raise AuditlensError(f"{path}: a zip file without data.pkl is not a torch state dict")
                root = pkl[: -len("data.pkl")]
                with archive.open(pkl) as f:
                    state = _TensorUnpickler(f).load()
                return _materialise(state, lambda key, dtype: np.frombuffer(archive.read(f"{root}data/{key}"), dtype=dtype))
        with open(path, "rb") as f:
            for _ in range(3):  # magic number, protocol version, system info
                _TensorUnpickler(f).load()
            state = _TensorUnpickler(f).load()
            storages = {}
            for key in _TensorUnpickler(f).load():
                dtype = next(v.dtype for v in state.values() if isinstance(v, _TensorRef) and v.key == str(key))
                count = int(np.frombuffer(f.read(8), dtype="<i8")[0])
                raw = f.read(count * dtype.itemsize)
                if len(raw) != count * dtype.itemsize:
                    raise AuditlensError(f"{path}: truncated weights file")
                storages[str(key)] = np.frombuffer(raw, dtype=dtype)
        return _materialise(state, lambda key, dtype: storages[key])
    except (pickle.UnpicklingError, EOFError, KeyError, StopIteration, ValueError, zipfile.BadZipFile) as exc:
        raise AuditlensError(f"{path}: not a readable torch state dict ({exc})") from exc


def mobilenet_v2_trunk(x, blocks: int = DEFAULT_TRUNK_BLOCKS, state: dict | None = None):
    """torchvision's MobileNetV2 ``features.0`` to ``features.<blocks>`` on Keras tensor ``x``
    (already normalised with the ImageNet mean and std); loads ``state`` when given."""
    from keras import layers

    if not 1 <= blocks <= 17:
        raise AuditlensError(f"MobileNetV2 has blocks 1 to 17, not {blocks}")
    pending: list[tuple] = []  # (Keras layer, torch name, kind): filled as layers are made

    def conv(x, prefix, filters, kernel, stride, depthwise, act, name):
        if kernel > 1:
            x = layers.ZeroPadding2D(kernel // 2, name=f"{name}_pad")(x)
        layer = (layers.DepthwiseConv2D(kernel, strides=stride, use_bias=False, name=f"{name}_dw") if depthwise
                 else layers.Conv2D(filters, kernel, strides=stride, use_bias=False, name=f"{name}_conv"))
        bn = layers.BatchNormalization(epsilon=1e-5, momentum=0.99, name=f"{name}_bn")
        x = bn(layer(x))
        pending.append((layer, f"{prefix[0]}.weight", "depthwise" if depthwise else "conv"))
        pending.append((bn, prefix[1], "bn"))
        return layers.ReLU(6.0, name=f"{name}_relu")(x) if act else x

    x = conv(x, ("features.0.0", "features.0.1"), 32, 3, 2, False, True, "mb_stem")
    channels, index = 32, 1
    for expansion, out, repeats, first_stride in MOBILENET_V2_SETTINGS:
        for r in range(repeats):
            if index > blocks:
                break
            stride = first_stride if r == 0 else 1
            p, name, y = f"features.{index}.conv", f"mb{index}", x
            hidden = channels * expansion
            if expansion != 1:
                y = conv(y, (f"{p}.0.0", f"{p}.0.1"), hidden, 1, 1, False, True, f"{name}_expand")
                dw, proj = (f"{p}.1.0", f"{p}.1.1"), (f"{p}.2", f"{p}.3")
            else:
                dw, proj = (f"{p}.0.0", f"{p}.0.1"), (f"{p}.1", f"{p}.2")
            y = conv(y, dw, hidden, 3, stride, True, True, f"{name}_dw")
            y = conv(y, proj, out, 1, 1, False, False, f"{name}_project")
            x = layers.Add(name=f"{name}_add")([x, y]) if stride == 1 and channels == out else y
            channels, index = out, index + 1
    if state is not None:
        load_trunk_weights(pending, state)
    return x


def load_trunk_weights(pending, state: dict) -> None:
    """Copy torch tensors into the Keras layers ``mobilenet_v2_trunk`` made."""
    for layer, key, kind in pending:
        try:
            if kind == "bn":
                weights = [state[f"{key}.{n}"] for n in ("weight", "bias", "running_mean", "running_var")]
            else:
                w = state[key]
                # torch (out, in/groups, kh, kw) -> Keras Conv2D (kh, kw, in, out) / depthwise (kh, kw, in, 1)
                weights = [w.transpose(2, 3, 0, 1) if kind == "depthwise" else w.transpose(2, 3, 1, 0)]
        except KeyError as exc:
            raise AuditlensError(f"the weights file lacks {exc.args[0]}: not torchvision's MobileNetV2") from exc
        expected = [tuple(v.shape) for v in layer.get_weights()]
        if [tuple(w.shape) for w in weights] != expected:
            raise AuditlensError(f"{key}: shape {[w.shape for w in weights]} does not fit {expected}: "
                                 "not torchvision's MobileNetV2 (width 1.0)")
        layer.set_weights(weights)
