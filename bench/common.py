"""Shared helpers: timing, the benchmark data and model, machine conditions, tables."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

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


def resolve_data(data: str | None, workdir: Path) -> Dataset:
    """``data``: a Grocery Store Dataset folder (with classes.csv), a folder with
    ``catalog.csv`` and ``photos.csv`` (like ``models/sample``), or None for the default:
    ``../shared/data/grocery-dev`` beside the repository when present, else the sample."""
    from auditlens.datasets import import_grocery

    if data is None:
        root = DEFAULT_GROCERY if (DEFAULT_GROCERY / "classes.csv").is_file() else SAMPLE
    else:
        root = Path(data)
    if (root / "classes.csv").is_file():
        written = import_grocery(root, workdir / "grocery")
        photos = written.get("val") or written.get("test") or written["train"]
        return Dataset(f"grocery-dev ({_shown(root)}, {photos.stem} split)", written["catalog"], photos,
                       written.get("train"))
    if (root / "catalog.csv").is_file() and (root / "photos.csv").is_file():
        return Dataset(f"sample ({_shown(root)})", root / "catalog.csv", root / "photos.csv")
    raise SystemExit(f"bench: {root}: neither a Grocery Store Dataset folder (classes.csv) "
                     "nor a folder with catalog.csv and photos.csv")


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


def conditions() -> dict:
    return {
        "cpu": cpu_model(), "logical_cpus": os.cpu_count(), "platform": platform.platform(),
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


def mib(nbytes: float) -> float:
    return nbytes / 1024**2


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"
