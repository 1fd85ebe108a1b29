"""Distillation targets: a pretrained model's features of the training images.

A large image model pretrained on millions of photos (an ImageNet classifier) describes a
product it never saw better than the small encoder trained on one catalogue does, but it is
several times too big for the phone. ``auditlens train --teacher-features F.npz`` passes
its knowledge on: a training-only linear head maps the encoder's latent to the teacher's
feature space, and the loss asks that the head's output of every view point where the
teacher's feature of that view's *clean* image points: the clean original's for the
original and its augmented copies, the photo's own for a field photo (the teacher sees the
photo unaugmented). The encoder must keep what the teacher sees, and lose what
augmentation changes.

The file is a plain ``.npz``, so any model, in any framework, can be the teacher:

* ``keys``: one string per image, :func:`image_key` of its encoded bytes (the same photo
  under another path or name is found);
* ``features``: float32 (N, D), row i the teacher's feature of image ``keys[i]``.

:func:`save_teacher_features` writes it; ``auditlens teacher-features`` computes it with a
Keras model (a ``.keras`` file, or a ``keras.applications`` network with weights on disk)
or a torchvision classifier (``.pth`` on disk). Features are
centred on the mean of the training images and L2-normalised before the loss
(:func:`centred_targets`): a ReLU network's raw features all point one way, and the
cosine of raw features would mostly measure that shared direction.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from auditlens.errors import CatalogError
from auditlens.training.pretrained import IMAGENET_MEAN, IMAGENET_STD


def image_key(source: str | bytes | Path) -> str:
    """sha256 hex of an image's encoded bytes (a path is read; bytes are hashed as they are)."""
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class TeacherFeatures:
    """Teacher features looked up by image content."""

    keys: tuple[str, ...]
    features: np.ndarray
    source: str = ""

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    @cached_property
    def row_of(self) -> dict[str, int]:
        """Row of each key."""
        return {k: i for i, k in enumerate(self.keys)}

    def lookup(self, images: Iterable[str | bytes], what: str) -> np.ndarray:
        """Rows of ``images`` (paths or encoded bytes), float32 (N, D); an image the file
        does not hold is refused with its name, before any training starts."""
        rows = []
        for image in images:
            key = image_key(image)
            if key not in self.row_of:
                name = f"{len(image)} bytes" if isinstance(image, bytes) else str(image)
                raise CatalogError(f"teacher features {self.source}: no feature for the {what} {name}; "
                                   "compute them for every training image (auditlens teacher-features)")
            rows.append(self.row_of[key])
        return self.features[np.asarray(rows, np.int64)] if rows else np.zeros((0, self.dim), np.float32)


def load_teacher_features(path: str | Path) -> TeacherFeatures:
    """Read a ``keys``/``features`` ``.npz`` (checked: shapes, finite values, no duplicates)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            keys = [str(k) for k in data["keys"]]
            features = np.asarray(data["features"], np.float32)
    except (OSError, ValueError, KeyError) as exc:
        raise CatalogError(f"teacher features {path}: not a keys/features .npz ({exc})") from exc
    if features.ndim != 2 or features.shape[0] != len(keys) or features.shape[1] == 0:
        raise CatalogError(f"teacher features {path}: {len(keys)} keys but features of shape {features.shape}")
    if not np.isfinite(features).all():
        raise CatalogError(f"teacher features {path}: features hold NaN or infinite values")
    teacher = TeacherFeatures(tuple(keys), features, str(path))
    if len(teacher.row_of) != len(keys):
        raise CatalogError(f"teacher features {path}: an image appears twice")
    return teacher


def save_teacher_features(path: str | Path, keys: list[str], features: np.ndarray) -> Path:
    """Write ``keys`` (from :func:`image_key`) and their ``features`` as an ``.npz``."""
    path = Path(path)
    features = np.asarray(features, np.float32)
    if features.ndim != 2 or len(keys) != len(features):
        raise ValueError(f"{len(keys)} keys for features of shape {features.shape}")
    unique: dict[str, int] = {}
    for i, k in enumerate(keys):  # the same image listed twice (a photo in two CSVs): once
        unique.setdefault(k, i)
    rows = np.fromiter(unique.values(), np.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, keys=np.asarray(list(unique), dtype=str), features=features[rows])
    return path


def centred_targets(features: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """``features - mean``, L2-normalised per row: the direction the distillation loss aims at."""
    x = np.asarray(features, np.float32) - np.asarray(mean, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


# -- computing features ----------------------------------------------------------------------
# keras.applications networks a teacher can be built from: name -> module of its preprocess_input
KERAS_APPLICATIONS = {
    "MobileNetV2": "mobilenet_v2",
    "MobileNetV3Small": "mobilenet_v3",
    "MobileNetV3Large": "mobilenet_v3",
    "EfficientNetB0": "efficientnet",
    "EfficientNetV2B0": "efficientnet_v2",
    "ResNet50": "resnet50",
    "ConvNeXtTiny": "convnext",
}


def _check_weights_file(weights: str | None) -> None:
    """A ``--weights`` file that is not there is named as such (Keras would say the
    argument should be None, 'imagenet' or a path)."""
    if weights and weights != "imagenet" and not Path(weights).is_file():
        raise ValueError(f"--weights {weights}: no such file")


def keras_teacher(model: str, weights: str | None, input_size: int):
    """An embedding function from a Keras model.

    ``model`` is a ``.keras`` file (it takes RGB floats 0..255 and returns a vector, or a
    feature map that is mean-pooled) or ``keras:NAME``, a ``keras.applications`` network
    without its classifier, average-pooled, with its own input preprocessing; its
    ``weights`` are a local file, or ``imagenet`` to let Keras download them (the only
    way this command touches the network, and only when asked to).
    """
    import keras

    if model.startswith("keras:"):
        name = model.split(":", 1)[1]
        if name not in KERAS_APPLICATIONS:
            raise ValueError(f"unknown keras application {name!r}; one of {', '.join(KERAS_APPLICATIONS)}")
        if not weights:
            raise ValueError(f"{model} needs --weights: a weights file on disk (or 'imagenet' to download it)")
        _check_weights_file(weights)
        net = getattr(keras.applications, name)(
            include_top=False, weights=weights, pooling="avg", input_shape=(input_size, input_size, 3))
        prepare = getattr(keras.applications, KERAS_APPLICATIONS[name]).preprocess_input
    else:
        _check_weights_file(weights)
        net = keras.saving.load_model(model, compile=False)
        if weights:
            net.load_weights(weights)

        def prepare(x):
            return x

    def embed(images: np.ndarray) -> np.ndarray:
        out = np.asarray(net(prepare(images.astype(np.float32)), training=False))
        return out.reshape(len(out), -1, out.shape[-1]).mean(axis=1) if out.ndim > 2 else out

    return embed


def torchvision_teacher(name: str, weights: str | None):
    """An embedding function from a torchvision classifier (needs torch and torchvision):
    its classification layer is dropped, what feeds it is the feature; ``weights`` is a
    ``state_dict`` file on disk (``.pth``)."""
    import torch
    import torchvision

    if not weights:
        raise ValueError(f"torchvision:{name} needs --weights: the network's .pth state_dict on disk")
    _check_weights_file(weights)
    net = torchvision.models.get_model(name)
    net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    for head in ("classifier", "fc", "heads"):
        if hasattr(net, head):
            setattr(net, head, torch.nn.Identity())
            break
    net.eval()

    def embed(images: np.ndarray) -> np.ndarray:
        x = (images.astype(np.float32) / 255.0 - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(
            IMAGENET_STD, np.float32)
        with torch.no_grad():
            return net(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()).numpy()

    return embed


def compute_teacher_features(sources: list[str | bytes], embed, spec, batch: int = 32,
                             progress: bool = True) -> tuple[list[str], np.ndarray]:
    """Keys and features of ``sources``, each preprocessed the device's way (``spec``)."""
    from tqdm import tqdm

    from auditlens.device_app.preprocess import stack_inputs

    features = []
    with tqdm(total=len(sources), desc="teacher features", unit="img", disable=not progress) as bar:
        for i in range(0, len(sources), batch):
            chunk = sources[i : i + batch]
            features.append(np.asarray(embed(stack_inputs(chunk, spec)), np.float32))
            bar.update(len(chunk))
    keys = [image_key(s) for s in sources]
    return keys, np.concatenate(features) if features else np.zeros((0, 0), np.float32)


def add_arguments(parser):
    parser.description = (
        "Compute a pretrained model's features of a catalogue's originals and labelled photos, "
        "for `auditlens train --teacher-features`. Nothing is downloaded unless --weights "
        "imagenet is given with a keras: model."
    )
    parser.add_argument("catalog", help="catalogue of originals: folder of images, CSV or sqlite:///db")
    parser.add_argument("--photos", nargs="*", default=[], metavar="CSV",
                        help="photo,product_id CSVs whose photos are embedded too (the training photos)")
    parser.add_argument("--model", required=True,
                        help="a .keras file (RGB 0..255 in, a vector out), keras:NAME (a "
                        f"keras.applications network: {', '.join(KERAS_APPLICATIONS)}) or "
                        "torchvision:NAME (e.g. torchvision:mobilenet_v2; needs torch)")
    parser.add_argument("--weights", help="weights file on disk (.weights.h5 / .h5 for Keras, .pth for "
                        "torchvision); 'imagenet' lets Keras download them")
    parser.add_argument("--input-size", type=int, default=224, help="teacher input side (default 224)")
    parser.add_argument("--crop", choices=("center", "full"), default="center",
                        help="crop of the images, as the encoder's preprocessing (default center)")
    parser.add_argument("--out", required=True, help="the .npz to write")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def run(args) -> int:
    import sys

    from auditlens.catalog import open_catalog, read_labelled_photos
    from auditlens.device_app.preprocess import PreprocessSpec

    catalog = open_catalog(args.catalog)
    sources: list[str | bytes] = [p.image for p in catalog]
    for csv_path in args.photos:
        sources += [p.photo for p in read_labelled_photos(csv_path)]
    try:
        if args.model.startswith("torchvision:"):
            embed = torchvision_teacher(args.model.split(":", 1)[1], args.weights)
        else:
            embed = keras_teacher(args.model, args.weights, args.input_size)
    except ImportError as exc:
        if (exc.name or "").split(".")[0] in ("keras", "tensorflow"):
            raise  # the command line names the extra that installs them, [train]
        hint = ("; torchvision teachers need torch and torchvision (pip install torch torchvision), "
                "which no auditlens extra installs" if args.model.startswith("torchvision:") else "")
        print(f"auditlens: error: {args.model} needs a package that is not installed "
              f"({exc}){hint}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as exc:
        print(f"auditlens: error: {exc}", file=sys.stderr)
        return 2
    spec = PreprocessSpec(input_size=args.input_size, crop=args.crop)
    keys, features = compute_teacher_features(sources, embed, spec, progress=not args.quiet)
    path = save_teacher_features(args.out, keys, features)
    print(f"{path}: {features.shape[1]}-d features of {len(set(keys))} images")
    return 0
