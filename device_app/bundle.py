"""The reference bundle: what a device needs to verify products offline.

A bundle is a folder (or the same files in one zip) holding::

    manifest.json     format version, sha256 of every file, preprocessing, latent size,
                      decision threshold (and what it was calibrated for), model id, probe
    manifest.sig      optional Ed25519 signature of manifest.json
    model.tflite      the encoder the latents were computed with
    references.npy    float16 (R, D) unit latents, one row per reference image
    cells.npy         optional int8 (R, C, D) feature-map cells of each reference
                      (a model exported with cells: :mod:`.cells`)
    cohort.npy        with cells.npy: int8 (K, C, D) cells of the originals a photo's
                      cell scores are standardised against
    products.json     per product: id, name, group, kind, code, reference rows, dHash
    thumbs/NNNN.jpg   a small thumbnail of each original, for display

Loading checks every file against its sha256, refuses paths outside the bundle and
symlinks, refuses latents made by another model, and (given a public key) refuses
unsigned or wrongly signed bundles. :func:`write_bundle` writes to a temporary path and
renames only when complete, so a crash never leaves half a bundle behind (a crash between
the two renames that replace a folder bundle leaves none at the path, the old one kept in
``.NAME.*/old`` beside it); it replaces an existing bundle or empty folder, and refuses to
write over anything else.
"""

from __future__ import annotations

import difflib
import hashlib
import io
import json
import math
import os
import re
import shutil
import stat
import tempfile
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from auditlens.catalog import IMAGE_SUFFIXES, check_product_id
from auditlens.device_app.cells import CELLS_FILE, COHORT_FILE, npy_bytes, score_ceiling
from auditlens.device_app.interpreter import model_id_of
from auditlens.device_app.preprocess import MAX_PHOTO_SHIFT, PreprocessSpec
from auditlens.device_app.rivals import (
    ALONE_KEYS,
    MAX_WEIGHT,
    RIVALS,
    effective_decision,
    without_rivals,
)
from auditlens.device_app.second_look import SecondLook
from auditlens.errors import (
    BundleError,
    BundleFormatError,
    BundleIntegrityError,
    CatalogError,
    ModelMismatchError,
    UnknownProductError,
)
from auditlens.files import check_not_under_a_file

FORMAT = "auditlens-bundle"
FORMAT_VERSION = 1
"""Bumped whenever a reader of the previous version would misread a new bundle."""

SHIFTED_FORMAT_VERSION = 2
"""The version of a bundle whose photo views include shifted copies (``photo_shift``):
a reader of version 1 would embed its photos without them and apply a threshold
calibrated for other views, so it must refuse the bundle. Bundles without a shift keep
version 1, which every reader reads."""

READABLE_VERSIONS = (FORMAT_VERSION, SHIFTED_FORMAT_VERSION)

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
MODEL_FILE = "model.tflite"
REFERENCES_FILE = "references.npy"
PRODUCTS_FILE = "products.json"
UNIT_TOLERANCE = 1e-2
"""How far a reference row's length may stray from 1 (float16 storage rounds it by ~1e-3)."""

MAX_BUNDLE_BYTES = 2 * 1024**3
"""Upper bound on what a bundle may unpack to (zip-bomb guard)."""

MAX_COMPRESSION_RATIO = 100
"""A zip member above 1 MiB that inflates more than this many times is refused (zip bomb);
real bundle files (model, float16 latents, JSON, JPEGs) compress far less."""

_SAFE_NAME = re.compile(r"^(model\.tflite|references\.npy|cells\.npy|cohort\.npy|products\.json|thumbs/[0-9]{4,9}\.(jpg|png))$")
_DHASH = re.compile(r"^[0-9a-fA-F]{1,16}$")

MAX_MANIFEST_BYTES = 64 * 1024**2
"""A manifest.json larger than this is not read when deciding whether a path is a bundle."""


@dataclass(frozen=True)
class ProductRecord:
    """A product as the device knows it."""

    product_id: str
    name: str
    group: str = ""
    kind: str = ""
    code: str = ""
    references: tuple[int, ...] = ()
    """Rows of ``references.npy`` that belong to this product (original first)."""
    dhash: str = ""
    """64-bit difference hash of the original, hex: flags photos that merely copy it."""
    thumbnail: str = ""
    """Path of the thumbnail inside the bundle."""
    box_dhashes: tuple[str, ...] = ()
    """dHashes of the original with its plain borders trimmed (its studio background):
    a photo of it on a white canvas is caught by them. Bundles before 2026-12-07 have none."""

    def to_dict(self) -> dict:
        return {
            "product_id": self.product_id, "name": self.name, "group": self.group,
            "kind": self.kind, "code": self.code, "references": list(self.references),
            "dhash": self.dhash, "thumbnail": self.thumbnail, "box_dhashes": list(self.box_dhashes),
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> ProductRecord:
        """Read a products.json entry as :meth:`to_dict` writes it; a field of another type
        (a null name, a reference row written as a string) is refused, not converted."""
        if not isinstance(d, Mapping):
            raise ValueError(f"a product entry is {type(d).__name__}, not an object")
        product_id = d.get("product_id")
        try:
            check_product_id(product_id)
        except CatalogError as exc:
            raise ValueError(str(exc)) from None
        texts = {}
        for key in ("name", "group", "kind", "code", "dhash", "thumbnail"):
            value = d.get(key, product_id if key == "name" else "")
            if not isinstance(value, str):
                raise ValueError(f"product {product_id!r}: {key} is {value!r}, not text")
            texts[key] = value
        rows = d.get("references", [])
        if not isinstance(rows, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in rows):
            raise ValueError(f"product {product_id!r}: references {rows!r} is not a list of row numbers")
        boxes = d.get("box_dhashes", [])
        if not isinstance(boxes, list) or not all(isinstance(h, str) for h in boxes):
            raise ValueError(f"product {product_id!r}: box_dhashes {boxes!r} is not a list of texts")
        return cls(product_id, texts["name"], texts["group"], texts["kind"], texts["code"],
                   tuple(rows), texts["dhash"], texts["thumbnail"], tuple(boxes))


def products_fingerprint(product_ids) -> dict:
    """Which products a threshold was calibrated with: their count and the sha256 of their
    sorted ids, one per line. A bundle of other products inherits the threshold but not
    its measured false-accept rate."""
    ids = sorted(product_ids)
    return {"count": len(ids), "sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest()}


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def probe_image(size: int, seed: int = 20260101) -> np.ndarray:
    """A fixed synthetic image; its latent, stored at enrolment, proves on load that the
    bundle's model is the one the references were computed with."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    base = np.stack([x, y, (x + y) / 2], axis=-1) * 200
    blocks = rng.integers(0, 56, size=(8, 8, 3)).repeat(-(-size // 8), 0).repeat(-(-size // 8), 1)
    return np.clip(base + blocks[:size, :size], 0, 255).astype(np.uint8)


# -- reading ------------------------------------------------------------------------
class _FolderSource:
    def __init__(self, root: Path):
        self.root = root
        self.real_root = root.resolve()

    def read(self, name: str) -> bytes:
        path = self.root / name
        if path.is_symlink():
            raise BundleFormatError(f"{self.root}: {name} is a symlink; bundles hold plain files only")
        try:
            resolved = path.resolve()
        except OSError as exc:
            raise BundleFormatError(f"{self.root}: cannot resolve {name}: {exc}") from exc
        if self.real_root not in resolved.parents:
            raise BundleFormatError(f"{self.root}: {name} points outside the bundle")
        try:
            st = path.stat()
            if not stat.S_ISREG(st.st_mode):  # a FIFO would block the read for ever
                raise BundleFormatError(f"{self.root}: {name} is not a regular file")
            if st.st_size > MAX_BUNDLE_BYTES:
                raise BundleFormatError(f"{self.root}: {name} is larger than a bundle may be")
            return path.read_bytes()
        except FileNotFoundError:
            raise BundleFormatError(f"{self.root}: the bundle has no {name}") from None
        except OSError as exc:
            raise BundleFormatError(f"{self.root}: cannot read {name}: {exc}") from exc

    def exists(self, name: str) -> bool:
        return (self.root / name).exists()

    def close(self) -> None:
        pass


def refuse_non_bundle(path: str | os.PathLike) -> None:
    """Refuse, as what it is, a path given as a bundle that is plainly something else of
    auditlens' (a model, its card, a bundle's own manifest, a training run)."""
    path = Path(path)
    what = ""
    if path.is_file() and path.name == MANIFEST:
        what = "a bundle's manifest: give the bundle's folder, the one holding it"
    elif path.is_file():
        what = {".tflite": "a TFLite model", ".keras": "a Keras model",
                ".json": "a JSON file (a model card or a report?)"}.get(path.suffix.lower(), "")
    elif path.is_dir() and not (path / MANIFEST).exists():
        if (path / "report.json").is_file():
            what = "a training run or an evaluation report"
        elif _holds_images(path):
            what = "a folder of images (a catalogue's originals?)"
    if what:
        raise BundleFormatError(f"{path} is {what}, not a reference bundle (a folder holding {MANIFEST}, "
                                "or its .zip); `auditlens enroll CATALOG --model MODEL.tflite --out BUNDLE` "
                                "makes one")


def _holds_images(folder: Path) -> bool:
    """Whether ``folder`` holds an image file at its top level (its first 1,000 entries)."""
    try:
        with os.scandir(folder) as entries:
            for i, entry in enumerate(entries):
                if i >= 1000:
                    break
                if Path(entry.name).suffix.lower() in IMAGE_SUFFIXES and entry.is_file():
                    return True
    except OSError:
        pass
    return False


class _ZipSource:
    def __init__(self, path: Path):
        self.path = path
        try:
            self.zip = zipfile.ZipFile(path)
            infos = self.zip.infolist()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
            # NotImplementedError: a damaged central directory asks for a zip version
            raise BundleFormatError(f"{path}: not a readable zip bundle: {exc}") from exc
        total = sum(i.file_size for i in infos)
        if total > MAX_BUNDLE_BYTES:
            raise BundleFormatError(f"{path}: unpacks to {total:,} bytes, more than a bundle may")
        packed = max(path.stat().st_size, 1)
        if total > 2**24 and total > MAX_COMPRESSION_RATIO * packed:  # many small bombs
            raise BundleFormatError(
                f"{path}: {packed:,} bytes unpack to {total:,} (more than "
                f"{MAX_COMPRESSION_RATIO}x): refused as a zip bomb")
        self.members = {}
        for info in infos:
            name = info.filename
            if name in self.members:  # zipfile would read the last; another tool the first
                raise BundleFormatError(f"{path}: member {name!r} appears twice in the zip")
            if name.startswith("/") or ".." in PurePosixPath(name).parts or "\\" in name:
                raise BundleFormatError(f"{path}: member {name!r} points outside the bundle")
            if (info.external_attr >> 16) & 0o170000 == 0o120000:
                raise BundleFormatError(f"{path}: member {name!r} is a symlink")
            if info.file_size > 2**20 and info.file_size > MAX_COMPRESSION_RATIO * max(info.compress_size, 1):
                raise BundleFormatError(
                    f"{path}: member {name!r} inflates {info.compress_size:,} bytes to "
                    f"{info.file_size:,} (more than {MAX_COMPRESSION_RATIO}x): refused as a zip bomb"
                )
            self.members[name] = info

    def read(self, name: str) -> bytes:
        info = self.members.get(name)
        if info is None:
            nested = sorted(m for m in self.members if m.endswith("/" + name))
            if nested:
                folder = nested[0][: -len(name)]
                raise BundleFormatError(
                    f"{self.path}: the zip holds the bundle inside a folder ({folder}); zip the "
                    "bundle's files themselves, e.g. `auditlens enroll ... --out bundle.zip`, or "
                    "`cd BUNDLE && python -m zipfile -c ../bundle.zip *`")
            raise BundleFormatError(f"{self.path}: the bundle has no {name}")
        try:
            with self.zip.open(info) as fh:
                data = fh.read(info.file_size + 1)
        except NotImplementedError as exc:  # a compression method zipfile cannot unpack
            raise BundleFormatError(
                f"{self.path}: cannot unpack {name}: {exc}; make the zip with `auditlens enroll "
                "... --out bundle.zip` or `python -m zipfile -c` (deflate or stored)") from exc
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError,
                RuntimeError) as exc:  # CRC, bad header, encrypted, ...
            raise BundleIntegrityError(f"{self.path}: {name} is corrupt in the zip: {exc}") from exc
        if len(data) != info.file_size:
            raise BundleFormatError(f"{self.path}: {name} does not unpack to its declared size")
        return data

    def exists(self, name: str) -> bool:
        return name in self.members

    def close(self) -> None:
        self.zip.close()


@dataclass
class ReferenceBundle:
    """A loaded, verified reference bundle."""

    path: Path
    manifest: dict
    model_content: bytes
    products: list[ProductRecord]
    references: np.ndarray
    """(R, D) unit rows as stored (float16 in every bundle :func:`write_bundle` makes:
    half the memory of float32; scores convert them, see ``search.cosines``)."""
    reference_owner: np.ndarray
    """int32 (R,): index into ``products`` of each reference row."""
    thumbnails: dict[str, bytes] = field(default_factory=dict, repr=False)
    signed_by: str | None = None
    """Key id of the publisher whose signature was checked; None: not checked."""
    has_signature: bool = False
    """The bundle carries a manifest.sig (checked only when a public key was given)."""
    manifest_sha256: str = ""
    """sha256 of manifest.json as stored; the manifest holds every file's sha256, so this
    names the bundle's whole content (see :attr:`bundle_id`)."""
    cells: np.ndarray | None = field(default=None, repr=False)
    """int8 (R, C, D): each reference row's feature-map cells (:mod:`.cells`), when the
    bundle's model gives them; None otherwise."""
    cohort: np.ndarray | None = field(default=None, repr=False)
    """int8 (K, C, D): the cohort's cells, beside ``cells``."""

    @property
    def cells_weight(self) -> float:
        """The cell term's weight in the score (:func:`~.cells.fuse`); 0: cosine alone."""
        block = self.decision.get("cells")
        return float(block["weight"]) if block and self.cells is not None else 0.0

    @property
    def model_id(self) -> str:
        return self.manifest["model"]["id"]

    @property
    def signature(self) -> str:
        """"checked" (signed, and the signature verified with a key), "unchecked" (a
        manifest.sig no key was given to check) or "unsigned"."""
        return "checked" if self.signed_by else "unchecked" if self.has_signature else "unsigned"

    @property
    def bundle_id(self) -> str:
        """The first 16 hex digits of :attr:`manifest_sha256`: two bundles with the same
        model (a re-enrolment, new products, a new threshold) have different ids, so an
        audit record names the references and threshold it was judged against."""
        return self.manifest_sha256[:16]

    @property
    def spec(self) -> PreprocessSpec:
        return PreprocessSpec.from_dict(self.manifest["preprocess"])

    @property
    def threshold(self) -> float:
        return float(self.decision["threshold"])

    @property
    def decision(self) -> dict:
        """The decision this bundle judges by: the manifest's, or, when it weighs rival
        products this bundle does not all hold, the one calibrated without them
        (:func:`~.rivals.effective_decision`)."""
        stored = self.manifest["decision"]
        if self._decision[0] is not stored:
            self._decision = (stored, effective_decision(stored, self._index))
        return self._decision[1]

    @property
    def rival_weight(self) -> float:
        """The rival term's weight in the score (:mod:`.rivals`); 0: none."""
        block = self.decision.get(RIVALS)
        return float(block["weight"]) if block else 0.0

    @property
    def second_look(self) -> SecondLook | None:
        """The decision's second look near the threshold, if it takes one."""
        return SecondLook.from_decision(self.decision, self.spec)

    @property
    def target_far(self) -> float | None:
        """The false-accept rate the threshold was calibrated for; None: never calibrated
        (``auditlens calibrate``), the default threshold or one given by hand."""
        return self.decision.get("target_far")

    @property
    def far_measured(self) -> bool:
        """Whether the decision's false-accept rates were measured on this bundle's products.
        A threshold lent by a model card calibrated on another catalogue carries over; the
        rates measured for it do not (a decision that does not say is taken at its word)."""
        calibrated_on = self.decision.get("products")
        if not isinstance(calibrated_on, dict) or "sha256" not in calibrated_on:
            return True
        return calibrated_on["sha256"] == products_fingerprint(p.product_id for p in self.products)["sha256"]

    def __post_init__(self) -> None:
        self._index = {p.product_id: i for i, p in enumerate(self.products)}
        self._decision: tuple = (None, None)  # (the manifest's decision, the one judged by)
        self._by_code = {p.code: i for i, p in enumerate(self.products) if p.code}

    def index(self, product_id: str) -> int:
        try:
            return self._index[product_id]
        except (KeyError, TypeError):
            near = self.near_id(product_id)
            raise UnknownProductError(
                f"product {product_id!r} is not in this bundle ({len(self.products)} products, "
                f"made {self.manifest.get('created', '?')}); "
                + (f"did you mean {near!r}?" if near else "enrol it or update the bundle (`auditlens info "
                   "BUNDLE --products` lists the ids it holds)")
            ) from None

    def near_id(self, product_id) -> str | None:
        """The one bundle id ``product_id`` equals but for case and surrounding spaces, else
        the closest one by spelling (a plural, a dropped letter), if any is close."""
        if not isinstance(product_id, str):
            return None
        key = product_id.strip().casefold()
        near = [p.product_id for p in self.products if p.product_id.casefold() == key]
        if near:
            return near[0] if len(near) == 1 else None
        folded = {p.product_id.casefold(): p.product_id for p in self.products}
        close = difflib.get_close_matches(key, folded, n=1, cutoff=0.85)
        return folded[close[0]] if close else None

    def product(self, product_id: str) -> ProductRecord:
        return self.products[self.index(product_id)]

    def product_for_code(self, code: str) -> ProductRecord | None:
        i = self._by_code.get(code)
        return None if i is None else self.products[i]

    def thumbnail(self, product_id: str) -> Image.Image:
        record = self.product(product_id)
        return Image.open(io.BytesIO(self.thumbnails[record.thumbnail])).convert("RGB")

    @classmethod
    def load(cls, path: str | os.PathLike, *, public_key: bytes | str | None = None) -> ReferenceBundle:
        """Load and verify a bundle folder or zip.

        Args:
            public_key: the publisher's Ed25519 public key (raw 32 bytes, or PEM/hex text).
                When given, unsigned or wrongly signed bundles are refused.
        """
        path = Path(path)
        refuse_non_bundle(path)
        if path.is_dir():
            source: _FolderSource | _ZipSource = _FolderSource(path)
        elif path.is_file():
            source = _ZipSource(path)
        else:
            raise BundleFormatError(f"{path}: no bundle here (expected a folder or a .zip)")
        try:  # closed on errors too: a BundleError's traceback would keep the zip open
            return cls._load(path, source, public_key)
        finally:
            source.close()

    @classmethod
    def _load(cls, path: Path, source: _FolderSource | _ZipSource,
              public_key: bytes | str | None) -> ReferenceBundle:
        raw_manifest = source.read(MANIFEST)
        try:
            manifest = json.loads(raw_manifest)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BundleIntegrityError(f"{path}: manifest.json is not valid JSON: {exc}") from exc
        except RecursionError:  # '[[[[...' nested deeper than the decoder recurses
            raise BundleIntegrityError(f"{path}: manifest.json nests too deep to be a manifest") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise BundleFormatError(f"{path}: not an auditlens bundle (manifest format is "
                                    f"{manifest.get('format') if isinstance(manifest, dict) else '?'!r})")
        version = manifest.get("format_version")
        if version not in READABLE_VERSIONS:
            raise BundleFormatError(
                f"{path}: bundle format version {version!r}, this auditlens reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))}; re-run `auditlens enroll` with this "
                "version to rebuild it"
            )

        signed_by = None
        if public_key is not None:
            from auditlens.device_app.signing import verify_manifest_signature

            # the key is read first: a file that is no key is said so, signed bundle or not
            signature = source.read(SIGNATURE) if source.exists(SIGNATURE) else None
            signed_by = verify_manifest_signature(raw_manifest, signature, public_key, where=str(path))

        files = manifest.get("files")
        if not isinstance(files, dict) or not files:
            raise BundleFormatError(f"{path}: manifest lists no files")
        contents: dict[str, bytes] = {}
        for name, digest in files.items():
            if not isinstance(name, str) or not _SAFE_NAME.match(name):
                raise BundleFormatError(f"{path}: manifest names an unexpected file {name!r}")
            data = source.read(name)
            if sha256_bytes(data) != digest:
                raise BundleIntegrityError(
                    f"{path}: {name} does not match its sha256 in the manifest; the bundle was "
                    "modified or corrupted after it was made: reinstall it from the publisher"
                )
            contents[name] = data
        for required in (MODEL_FILE, REFERENCES_FILE, PRODUCTS_FILE):
            if required not in contents:
                raise BundleFormatError(f"{path}: manifest does not list {required}")

        try:
            model = manifest["model"]
            if model_id_of(contents[MODEL_FILE]) != model["id"]:
                raise ModelMismatchError(f"{path}: model.tflite is not the model {model['id']} "
                                         "named in the manifest")
            if manifest["references_model_id"] != model["id"]:
                raise ModelMismatchError(
                    f"{path}: the reference latents were computed with model "
                    f"{manifest['references_model_id']}, but the bundle carries model {model['id']}; "
                    "re-enrol the catalogue with this model"
                )
            references = _load_npy(contents[REFERENCES_FILE], path)
            cells, cohort = (_load_npy(contents[name], path, name) if name in contents else None
                             for name in (CELLS_FILE, COHORT_FILE))
            products = [ProductRecord.from_dict(d) for d in json.loads(contents[PRODUCTS_FILE])]
            spec = PreprocessSpec.from_dict(manifest["preprocess"])
            if spec.photo_shift and version < SHIFTED_FORMAT_VERSION:
                raise ValueError(f"photo_shift needs bundle format version {SHIFTED_FORMAT_VERSION}, "
                                 f"not {version}")
        except ModelMismatchError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, EOFError, OSError,
                json.JSONDecodeError) as exc:
            raise BundleFormatError(f"{path}: malformed bundle contents: {exc!r}") from exc
        except RecursionError:
            raise BundleFormatError(f"{path}: malformed bundle contents: products.json nests too deep") from None

        if references.dtype.kind != "f":
            raise BundleFormatError(f"{path}: references.npy holds {references.dtype}, not floating-point "
                                    "latents")
        if references.ndim != 2 or references.shape[1] != manifest.get("latent_dim"):
            raise BundleFormatError(f"{path}: references.npy has shape {references.shape}, "
                                    f"expected (R, {manifest.get('latent_dim')})")
        # held as float16 in native byte order, whatever float type the file holds
        references = references.astype(np.float16, copy=False)
        _check_unit_rows(references, path)
        _check_cells(cells, cohort, references, manifest.get("decision"), path)
        _check_probe(manifest, path)
        check_decision(manifest.get("decision"), path, spec=spec)
        thumbs = {n: d for n, d in contents.items() if n.startswith("thumbs/")}
        owner = np.full(len(references), -1, dtype=np.int32)
        for i, record in enumerate(products):
            if not record.references:
                raise BundleFormatError(f"{path}: product {record.product_id!r} has no reference rows")
            if record.thumbnail not in thumbs:
                raise BundleFormatError(f"{path}: product {record.product_id!r} names thumbnail "
                                        f"{record.thumbnail!r}, which the manifest does not list")
            for value in [record.dhash][:bool(record.dhash)] + list(record.box_dhashes):
                if not _DHASH.match(value):
                    raise BundleFormatError(f"{path}: product {record.product_id!r} has a dhash "
                                            f"{value!r} that is not hexadecimal")
            for row in record.references:
                if not 0 <= row < len(references) or owner[row] != -1:
                    raise BundleFormatError(f"{path}: product {record.product_id!r} names an "
                                            f"invalid reference row {row}")
                owner[row] = i
        unused = sorted(set(thumbs) - {p.thumbnail for p in products})
        if unused:
            raise BundleFormatError(f"{path}: the manifest lists {len(unused)} thumbnails no product "
                                    f"shows ({unused[0]}, ...)")
        if (owner < 0).any():
            raise BundleFormatError(f"{path}: {(owner < 0).sum()} reference rows belong to no product")
        if len({p.product_id for p in products}) != len(products):
            raise BundleFormatError(f"{path}: duplicate product ids in products.json")
        codes = [p.code for p in products if p.code]
        if len(set(codes)) != len(codes):
            raise BundleFormatError(f"{path}: two products share a code in products.json; "
                                    "a scanned code must name one product")

        return cls(path, manifest, contents[MODEL_FILE], products,
                   references, owner, thumbs, signed_by,
                   has_signature=source.exists(SIGNATURE),
                   manifest_sha256=sha256_bytes(raw_manifest), cells=cells, cohort=cohort)


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _is_finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_probe(manifest: dict, path: Path) -> None:
    """The probe latent must be a latent of the bundle's size: the verifier compares the
    model's own probe latent with it before it trusts the references."""
    probe = manifest.get("probe")
    latent = probe.get("latent") if isinstance(probe, dict) else None
    if not isinstance(latent, list):
        raise BundleFormatError(f"{path}: manifest has no probe latent (probe.latent), which proves "
                                "the model and the references belong together")
    if len(latent) != manifest.get("latent_dim"):
        raise BundleFormatError(f"{path}: manifest probe.latent has {len(latent)} values, expected "
                                f"latent_dim {manifest.get('latent_dim')}")
    if not all(_is_finite_number(v) and abs(v) <= _FLOAT32_MAX for v in latent):
        raise BundleFormatError(f"{path}: manifest probe.latent holds values that are not finite "
                                "float32 numbers")
    norm = math.sqrt(math.fsum(float(v) * float(v) for v in latent))
    if not abs(norm - 1.0) <= 0.01:  # enrol writes the model's unit latent of the probe image
        raise BundleFormatError(f"{path}: manifest probe.latent has length {norm:.4g}, not the unit "
                                "latent the model gives its probe image")


def check_decision(decision, path: Path, what: str = "manifest decision", *,
                   spec: PreprocessSpec | None = None) -> None:
    """``threshold`` is a cosine (moved by the cell term of a decision that weighs cells);
    ``far_curve``, when there is one, is [[score, far], ...]
    by strictly increasing score with falling FAR (the verifier interpolates it); a
    ``second_look`` has the same, and given the photos' ``spec``, views that can take it."""
    if not isinstance(decision, dict):
        raise BundleFormatError(f"{path}: {what} is missing or not an object")
    cells = decision.get("cells")
    if cells is not None and not (isinstance(cells, dict) and _is_finite_number(cells.get("weight"))
                                  and 0.0 <= cells["weight"] <= 1.0):
        raise BundleFormatError(f"{path}: {what}.cells is not an object with a weight within [0, 1] "
                                f"(the cell term's weight in the score): {cells!r:.200}")
    # a score is a cosine, which the cell term moves by its weight times a z-score
    limit = score_ceiling(cells["weight"] if cells else 0.0)
    threshold = decision.get("threshold")
    if not _is_finite_number(threshold) or not -limit <= threshold <= limit:
        raise BundleFormatError(f"{path}: {what}.threshold {threshold!r} is not a "
                                + (f"score within [-{limit:g}, {limit:g}]" if cells else "cosine within [-1, 1]"))
    target_far = decision.get("target_far")
    if target_far is not None and not (_is_finite_number(target_far) and 0.0 <= target_far <= 1.0):
        raise BundleFormatError(f"{path}: {what}.target_far {target_far!r} is not a "
                                "rate within [0, 1]")
    second = decision.get("second_look")
    if second is not None:
        _check_second_look(second, path, f"{what}.second_look", limit)
        if spec is not None:
            try:
                SecondLook.from_decision(decision, spec)
            except ValueError as exc:  # views edited to ones that cannot take it
                raise BundleFormatError(f"{path}: {what}'s second look: {exc}") from exc
    _check_far_curve(decision.get("far_curve"), path, what)
    rivals = decision.get(RIVALS)
    if rivals is not None:
        _check_rivals(rivals, decision, path, f"{what}.{RIVALS}", spec)


def _check_rivals(block, decision: dict, path: Path, what: str, spec: PreprocessSpec | None) -> None:
    """A rival term (:mod:`.rivals`): its weight, the products it was calibrated with, and
    the decision without it, which must hold up as a decision of its own."""
    if not (isinstance(block, dict) and _is_finite_number(block.get("weight"))
            and 0.0 < block["weight"] <= MAX_WEIGHT):
        raise BundleFormatError(f"{path}: {what} is not an object with a weight within (0, {MAX_WEIGHT:g}] "
                                f"(the rival term's weight in the score): {block!r:.200}")
    products = block.get("products")
    if not (isinstance(products, list) and products and all(isinstance(p, str) for p in products)):
        raise BundleFormatError(f"{path}: {what}.products is not the list of product ids it was calibrated with")
    alone = block.get("alone")
    if not isinstance(alone, dict) or "threshold" not in alone or not set(alone) <= set(ALONE_KEYS):
        raise BundleFormatError(f"{path}: {what}.alone is not the decision calibrated without rivals "
                                f"(an object of {', '.join(ALONE_KEYS)})")
    check_decision(without_rivals(decision), path, f"{what}.alone", spec=spec)


def _check_second_look(block, path: Path, what: str, limit: float = 1.0) -> None:
    """A second look (:mod:`.second_look`): a shift and band, and a threshold with its own
    far_curve."""
    if not isinstance(block, dict):
        raise BundleFormatError(f"{path}: {what} is not an object")
    shift, band, threshold = block.get("photo_shift"), block.get("band"), block.get("threshold")
    if not _is_finite_number(shift) or not 0.0 < shift <= MAX_PHOTO_SHIFT:
        raise BundleFormatError(f"{path}: {what}.photo_shift {shift!r} is not a shift within "
                                f"(0, {MAX_PHOTO_SHIFT}]")
    if not _is_finite_number(band) or not 0.0 < band <= 1.0:
        raise BundleFormatError(f"{path}: {what}.band {band!r} is not a cosine band within (0, 1]")
    if not _is_finite_number(threshold) or not -limit <= threshold <= limit:
        raise BundleFormatError(f"{path}: {what}.threshold {threshold!r} is not a "
                                + (f"score within [-{limit:g}, {limit:g}]" if limit > 1 else "cosine within [-1, 1]"))
    _check_far_curve(block.get("far_curve"), path, what)


def _check_far_curve(curve, path: Path, what: str) -> None:
    if not curve:  # absent, null or []: not calibrated
        return
    if not isinstance(curve, list) or not all(
            isinstance(p, list) and len(p) == 2 and all(_is_finite_number(v) for v in p) for p in curve):
        raise BundleFormatError(f"{path}: {what}.far_curve is not a list of "
                                "[score, far] pairs of finite numbers")
    scores, fars = np.asarray(curve, dtype=np.float64).T
    if (np.diff(scores) <= 0).any() or (np.diff(fars) > 0).any() or not ((0 <= fars) & (fars <= 1)).all():
        raise BundleFormatError(f"{path}: {what}.far_curve must have strictly increasing "
                                "scores and falling false-accept rates within [0, 1]")


def _check_unit_rows(references: np.ndarray, path: Path, block: int = 65536) -> None:
    """Finite unit rows, checked a block at a time in float32 (a large catalogue's
    float16 latents are never held as float32 all at once)."""
    for start in range(0, len(references), block):
        rows = np.asarray(references[start:start + block], dtype=np.float32)
        if not np.isfinite(rows).all():
            raise BundleFormatError(f"{path}: references.npy holds NaN or infinite values")
        norms = np.linalg.norm(rows, axis=1)
        worst = int(np.abs(norms - 1.0).argmax())
        if abs(norms[worst] - 1.0) > UNIT_TOLERANCE:
            raise BundleFormatError(
                f"{path}: references.npy row {start + worst} has length {norms[worst]:.4g}, not 1: "
                "reference latents must be unit vectors, or every score leaves the cosine range; "
                "re-enrol the catalogue")


def _check_cells(cells: np.ndarray | None, cohort: np.ndarray | None, references: np.ndarray, decision,
                 path: Path) -> None:
    """cells.npy, when there is one: int8 (R, C, D) beside the (R, D) references, with a
    cohort.npy of int8 (K, C, D); a decision that weighs cells into the score needs them."""
    if cells is None:
        if isinstance(decision, dict) and decision.get("cells"):
            raise BundleFormatError(f"{path}: the decision weighs cells into the score, but the bundle "
                                    f"holds no {CELLS_FILE}")
        if cohort is not None:
            raise BundleFormatError(f"{path}: {COHORT_FILE} without {CELLS_FILE}")
        return
    rows, dim = references.shape
    if cells.dtype != np.int8 or cells.ndim != 3 or cells.shape[0] != rows or cells.shape[2] != dim \
            or cells.shape[1] == 0:
        raise BundleFormatError(f"{path}: {CELLS_FILE} holds {cells.dtype} {cells.shape}, expected int8 "
                                f"(R, C, D) with R = {rows} references and D = {dim}")
    if cohort is None or cohort.dtype != np.int8 or cohort.ndim != 3 or cohort.shape[1:] != cells.shape[1:] \
            or len(cohort) == 0:
        got = "none" if cohort is None else f"{cohort.dtype} {cohort.shape}"
        raise BundleFormatError(f"{path}: {COHORT_FILE} holds {got}, expected int8 (K, C, D) with "
                                f"C, D = {cells.shape[1]}, {dim} as in {CELLS_FILE}")


def _load_npy(data: bytes, path: Path, name: str = REFERENCES_FILE) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:  # numpy raises many types (ValueError, EOFError, SyntaxError, ...)
        raise BundleFormatError(f"{path}: {name} is not a readable array: {exc!r}") from exc


# -- writing ------------------------------------------------------------------------
def write_bundle(
    out: str | os.PathLike,
    *,
    model_content: bytes,
    spec: PreprocessSpec,
    products: Sequence[ProductRecord],
    references: np.ndarray,
    thumbnails: Sequence[bytes],
    decision: Mapping,
    probe_latent: Sequence[float],
    extra: Mapping | None = None,
    signing_key: bytes | str | None = None,
    cells: np.ndarray | None = None,
    cohort: np.ndarray | None = None,
) -> Path:
    """Write a bundle folder, or a zip when ``out`` ends in ``.zip``, atomically.

    ``thumbnails[i]`` is the JPEG of ``products[i]``'s original; ``decision`` holds at
    least ``threshold``. An existing bundle at ``out`` is replaced only once the new one
    is complete; anything else at ``out`` but an empty folder is refused
    (:func:`check_replaceable`), never deleted. ``cells``: int8 (R, C, D) cells of the
    references (:func:`~.cells.quantize_cells`), for a model that gives them, with the
    ``cohort``'s (K, C, D).
    """
    from datetime import datetime, timezone

    import auditlens

    out = Path(out)
    check_decision(dict(decision), out, spec=spec)  # nothing is replaced by a bundle no device would load
    _check_cells(None if cells is None else np.asarray(cells), None if cohort is None else np.asarray(cohort),
                 np.asarray(references), dict(decision), out)
    model_id = model_id_of(model_content)
    files: dict[str, bytes] = {MODEL_FILE: model_content}
    buf = io.BytesIO()
    np.save(buf, np.asarray(references, dtype=np.float16), allow_pickle=False)
    files[REFERENCES_FILE] = buf.getvalue()
    for name, array in ((CELLS_FILE, cells), (COHORT_FILE, cohort)):
        if array is not None:
            files[name] = npy_bytes(array)
    records = []
    for i, (record, thumb) in enumerate(zip(products, thumbnails, strict=True)):
        name = f"thumbs/{i:04d}.jpg"
        files[name] = thumb
        records.append(ProductRecord(**{**record.to_dict(), "references": tuple(record.references),
                                        "box_dhashes": tuple(record.box_dhashes), "thumbnail": name}))
    files[PRODUCTS_FILE] = json.dumps([r.to_dict() for r in records], ensure_ascii=False,
                                      indent=1).encode("utf-8")
    manifest = {
        "format": FORMAT,
        "format_version": SHIFTED_FORMAT_VERSION if spec.photo_shift else FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "auditlens_version": auditlens.__version__,
        "model": {"file": MODEL_FILE, "id": model_id},
        "references_model_id": model_id,
        "preprocess": spec.to_dict(),
        "latent_dim": int(np.asarray(references).shape[1]),
        "latent_dtype": "float16",
        "counts": {"products": len(records), "references": int(len(references))},
        "decision": dict(decision),
        "probe": {"seed": 20260101, "latent": [round(float(v), 6) for v in probe_latent]},
        **(dict(extra) if extra else {}),
        "files": {name: sha256_bytes(data) for name, data in sorted(files.items())},
    }
    files[MANIFEST] = json.dumps(manifest, indent=1, ensure_ascii=False).encode("utf-8")
    if signing_key is not None:
        from auditlens.device_app.signing import sign_manifest

        files[SIGNATURE] = sign_manifest(files[MANIFEST], signing_key)

    try:
        _write_files(out, files)
    except OSError as exc:  # disk full, file too large, read-only, ...: nothing was replaced
        raise BundleError(f"{out}: cannot write the bundle: {exc}") from exc
    return out


def is_signed(path: str | os.PathLike) -> bool:
    """Whether the bundle at ``path`` carries a manifest signature."""
    path = Path(path)
    if path.is_dir():
        return (path / SIGNATURE).exists()
    try:
        with zipfile.ZipFile(path) as zf:
            return SIGNATURE in zf.namelist()
    except (OSError, zipfile.BadZipFile):
        return False


def calibration_of(path: str | os.PathLike) -> dict | None:
    """The decision of the bundle at ``path`` when it holds a calibrated threshold (one
    with a target false-accept rate), else None; None too when there is no readable bundle
    there (its own checks come when it is loaded)."""
    path = Path(path)
    source = None
    try:
        source = _FolderSource(path) if path.is_dir() else _ZipSource(path)
        decision = json.loads(source.read(MANIFEST)).get("decision")
    except (BundleError, OSError, ValueError, AttributeError, zipfile.BadZipFile):
        return None
    finally:
        if source is not None:
            source.close()
    return decision if isinstance(decision, dict) and decision.get("target_far") else None


def check_replaceable(out: str | os.PathLike, *, advice: str = "choose another --out or remove it") -> None:
    """Raise :class:`BundleError` (an ``OutputPathError`` when ``out`` lies under a plain
    file) unless writing a bundle to ``out`` would replace nothing
    but a bundle: ``out`` does not exist, is an empty folder, or is a bundle folder or zip
    holding only bundle files. Writing deletes what is at ``out``; a folder of originals or
    any other file there must survive. Cheap: call it before costly work."""
    out = Path(out)
    if not out.exists():
        check_not_under_a_file(out)
        return
    try:
        why = _not_a_bundle(out)
    except OSError as exc:
        why = f"cannot read it: {exc}"
    if why:
        raise BundleError(f"{out} exists and is not an auditlens bundle ({why}); writing the bundle "
                          f"would delete it: {advice}")


def _is_bundle_file(name: str) -> bool:
    return name in (MANIFEST, SIGNATURE) or bool(_SAFE_NAME.match(name))


def _is_bundle_manifest(data: bytes) -> bool:
    try:
        manifest = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT


def _not_a_bundle(out: Path) -> str:
    """Why ``out`` (which exists) may not be replaced by a bundle, or '' when it may."""
    if out.is_dir():
        if not os.listdir(out):
            return ""
        manifest = out / MANIFEST
        if manifest.is_symlink() or not manifest.is_file():
            return f"it has no {MANIFEST}"
        with open(manifest, "rb") as fh:
            if not _is_bundle_manifest(fh.read(MAX_MANIFEST_BYTES)):
                return f"its {MANIFEST} is not an auditlens bundle manifest"

        def fail(exc: OSError) -> None:
            raise exc

        for root, dirs, names in os.walk(out, onerror=fail):
            for name in dirs + names:
                rel = (Path(root) / name).relative_to(out).as_posix()
                if not (rel == "thumbs" and name in dirs) and not _is_bundle_file(rel):
                    return f"it holds {rel}, which is not a bundle file"
        return ""
    if out.is_file():
        try:
            with zipfile.ZipFile(out) as zf:
                infos = zf.infolist()
                info = next((i for i in infos if i.filename == MANIFEST), None)
                if info is None or info.file_size > MAX_MANIFEST_BYTES:
                    return f"it is a zip without an auditlens {MANIFEST}"
                if not _is_bundle_manifest(zf.read(info)):
                    return f"its {MANIFEST} is not an auditlens bundle manifest"
        except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, NotImplementedError, RuntimeError):
            return "it is a file but not a zip bundle"
        stray = [i.filename for i in infos if i.filename != "thumbs/" and not _is_bundle_file(i.filename)]
        return f"it holds {stray[0]}, which is not a bundle file" if stray else ""
    return "it is neither a folder nor a file"


def _write_files(out: Path, files: dict[str, bytes]) -> None:
    check_replaceable(out)  # again: the path may have changed since the caller checked
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if out.suffix.lower() == ".zip":
            staged = tmp / out.name
            with zipfile.ZipFile(staged, "w", compression=zipfile.ZIP_STORED) as zf:
                for name, data in files.items():
                    zf.writestr(name, data)
        else:
            staged = tmp / "bundle"
            for name, data in files.items():
                target = staged / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
        _fsync_tree(staged)
        if out.is_dir() and not out.is_symlink():
            old = tmp / "old"
            os.replace(out, old)
            try:
                os.replace(staged, out)
            except BaseException:
                os.replace(old, out)  # never delete the installed bundle with tmp below
                raise
        else:
            os.replace(staged, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fsync_tree(path: Path) -> None:
    """Make the staged bundle durable before it is renamed into place."""
    if path.is_dir() and hasattr(os, "sync"):
        os.sync()  # one flush for hundreds of thumbnails; a per-file fsync costs ~3 ms each
        return
    for file in sorted(path.rglob("*")) if path.is_dir() else [path]:  # Windows has no os.sync
        if file.is_file():
            with open(file, "r+b") as fh:  # Windows fsyncs only handles open for writing
                os.fsync(fh.fileno())
