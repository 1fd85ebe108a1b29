"""Shared helpers: timing, the benchmark data and model, machine conditions, tables."""

from __future__ import annotations

import io
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
DEFAULT_GROCERY = REPO.parent / "shared" / "data" / "grocery-dev"
SAMPLE = REPO / "models" / "sample"
DEFAULT_MODEL = REPO / "models" / "encoder.tflite"
DEFAULT_KERAS = REPO / "models" / "default.keras"


# -- timing -----------------------------------------------------------------------------
@dataclass
class Timing:
    """Wall-clock times of repeated runs, in milliseconds."""

    times_ms: list[float]

    @property
    def n(self) -> int:
        return len(self.times_ms)

    @property
    def median(self) -> float:
        return float(np.median(self.times_ms))

    @property
    def p95(self) -> float:
        return float(np.percentile(self.times_ms, 95))

    def to_dict(self) -> dict:
        return {"median_ms": round(self.median, 4), "p95_ms": round(self.p95, 4), "runs": self.n}

    def cell(self, digits: int = 2) -> str:
        return f"{self.median:.{digits}f} / {self.p95:.{digits}f}"


def measure(fn: Callable[[], object], runs: int, *, warmup: int = 2,
            budget_s: float | None = None) -> Timing:
    """Time ``fn`` ``runs`` times after ``warmup`` calls (stopping early, after at least 5
    runs, once ``budget_s`` seconds are spent)."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    for i in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        if budget_s is not None and i >= 4 and time.perf_counter() - start > budget_s:
            break
    return Timing(times)


def measure_interleaved(fns: Sequence[Callable[[], object]], runs: int, *,
                        warmup: int = 2) -> list[Timing]:
    """Time several functions in alternation (a, b, a, b, ...), so that drifting load on a
    shared machine affects each alike: the fair way to compare two variants."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(runs):
        for fn, out in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
    return [Timing(t) for t in times]


# -- data -------------------------------------------------------------------------------
class UsageError(Exception):
    """A command-line input the bench cannot use (``python -m bench`` exits 2 with it)."""


@dataclass
class Dataset:
    """The catalogue and labelled field photos a run uses."""

    name: str
    catalog_csv: Path
    photos_csv: Path
    """Evaluation photos (the validation split for grocery-dev)."""
    extra_csv: Path | None = None
    """More photos (the training split), used only to enrol a larger catalogue for speed."""
    notes: list[str] = field(default_factory=list)
    split: str | None = None
    """Which split of the Grocery Store Dataset ``photos_csv`` is ('val', 'test', 'train');
    None for a folder with its own photos.csv."""


LAYOUTS = ("a Grocery Store Dataset folder (classes.csv; its val split is scored), "
           "the output of `auditlens import-grocery` (catalog.csv + val.csv, val scored; "
           "train.csv, when there, enrolled only for speed), or a folder with catalog.csv + "
           "photos.csv (photos.csv scored)")


def data_root(data: str | os.PathLike | None) -> Path:
    """The absolute folder ``--data`` names (None: ``../shared/data/grocery-dev`` beside the
    repository when present, else the sample), checked before anything is written."""
    if data is None:
        return DEFAULT_GROCERY if (DEFAULT_GROCERY / "classes.csv").is_file() else SAMPLE
    root = Path(data).resolve()
    if not root.exists():
        raise UsageError(f"--data {data}: no such folder")
    if not root.is_dir():
        raise UsageError(f"--data {data}: not a folder; expected {LAYOUTS}")
    if not (_grocery(root) or _imported(root) or _own_photos(root)):
        raise UsageError(f"--data {data}: expected {LAYOUTS}")
    return root


def _grocery(root: Path) -> bool:
    return (root / "classes.csv").is_file()


def _imported(root: Path) -> bool:
    return (root / "catalog.csv").is_file() and (root / "val.csv").is_file()


def _own_photos(root: Path) -> bool:
    return (root / "catalog.csv").is_file() and (root / "photos.csv").is_file()


def resolve_data(root: Path, workdir: Path) -> Dataset:
    """The :class:`Dataset` of a folder :func:`data_root` accepted: a Grocery Store Dataset
    folder is imported into ``workdir`` first (``auditlens import-grocery``)."""
    from auditlens.datasets import import_grocery

    if _grocery(root):
        written = import_grocery(root, workdir / "grocery")
        split = next(s for s in ("val", "test", "train") if written.get(s))
        return Dataset(f"grocery-dev ({_shown(root)}, {split} split)", written["catalog"], written[split],
                       written.get("train"), split=split)
    if _imported(root):
        train = root / "train.csv"
        return Dataset(f"auditlens import-grocery output ({_shown(root)}, val split)", root / "catalog.csv",
                       root / "val.csv", train if train.is_file() else None, split="val")
    return Dataset(f"sample ({_shown(root)})", root / "catalog.csv", root / "photos.csv")


def pixel_size(images) -> str:
    """The size of images as the report states it: ``348x348 px`` when they all have it,
    else the range of their longer sides (``198-348 px``)."""
    sizes = set()
    for image in images:
        with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as im:
            sizes.add(im.size)
    if not sizes:
        return "no images"
    if len(sizes) == 1:
        w, h = next(iter(sizes))
        return f"{w}x{h} px"
    sides = [max(s) for s in sizes]
    return f"{min(sides)}-{max(sides)} px"


def rel(path) -> str:
    """``path`` relative to the repository when inside it (reports stay machine-neutral)."""
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def _shown(path: Path) -> str:
    """A data path as the report shows it: relative to the repository's parent if below it."""
    try:
        return str(Path(path).resolve().relative_to(REPO.parent))
    except ValueError:
        return str(path)


# -- conditions -------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "numpy": np.__version__}
    for name, module in (("pillow", "PIL"), ("opencv", "cv2"), ("scikit-image", "skimage"),
                         ("imagehash", "imagehash"), ("ai-edge-litert", "ai_edge_litert")):
        try:
            mod = __import__(module)
            out[name] = getattr(mod, "__version__", "?")
        except ImportError:
            out[name] = "not installed"
    if out.get("ai-edge-litert") == "?":
        try:
            from importlib.metadata import version

            out["ai-edge-litert"] = version("ai-edge-litert")
        except Exception:
            pass
    return out


def blas_threads() -> str:
    """numpy's BLAS threads as the report states them (see ``bench/__init__.py``)."""
    from . import BLAS_SINGLE_THREADED, BLAS_THREAD_VARIABLES

    if BLAS_SINGLE_THREADED:
        return "1 (" + ", ".join(f"{v}=1" for v in BLAS_THREAD_VARIABLES) + " set before numpy loaded)"
    return ("not limited by the bench: numpy was loaded before it (" + ", ".join(
        f"{v}={os.environ.get(v, 'unset')}" for v in BLAS_THREAD_VARIABLES) + ")")


def conditions() -> dict:
    return {
        "cpu": cpu_model(), "logical_cpus": os.cpu_count(), "platform": platform.platform(),
        "blas_threads": blas_threads(),
        "load_average_1_5_15": load_average(), "versions": versions(),
        "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }


# -- tables -----------------------------------------------------------------------------
def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table."""
    def fmt(v) -> str:
        if v is None:
            return "n/a"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"
