"""Peak memory (RSS) of fresh processes: ``auditlens verify``, the engine (a loaded
``Verifier`` verifying phone photos), and each method verifying the same photo 5 times
(a data set photo, then a 12 MP phone JPEG).

Each measurement is a new Python process started with this interpreter; its peak
resident set size is the kernel's ``VmHWM`` of that process, read at exit, so imports,
the interpreter and every allocation count. A bare ``import numpy, PIL`` process is the
floor every row includes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from .common import REPO, pixel_size

CLI = "import sys; from auditlens.cli import main; sys.exit(main())"

_PEAK = """import atexit, sys
def _auditlens_bench_peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            print("@@VmHWM", int(line.split()[1]), file=sys.stderr, flush=True)
atexit.register(_auditlens_bench_peak)
"""
"""Prepended to every child: at exit it reports the process's own peak RSS (VmHWM, which
starts afresh at exec, unlike the rusage of a forked child that inherits the parent's)."""


def _run(code: str, args: list[str], ok: tuple[int, ...] = (0,)) -> tuple[int, float, str]:
    """(exit status, peak RSS in MiB, stdout) of ``python -c code args``; an exit status
    not in ``ok`` (a child that crashed, whose peak would still be printed) is an error."""
    proc = subprocess.run([sys.executable, "-c", _PEAK + code, *args], cwd=REPO,
                          capture_output=True, text=True)
    if proc.returncode not in ok:
        raise RuntimeError(f"{code[:60]!r} {' '.join(args[:3])}... failed ({proc.returncode}): "
                           f"{proc.stderr[-2000:]}")
    peak = float("nan")
    for line in proc.stderr.splitlines():
        if line.startswith("@@VmHWM"):
            peak = int(line.split()[1]) / 1024
    return proc.returncode, peak, proc.stdout


def _child(*args: str) -> tuple[str, list[str]]:
    return "from bench.memory import main; main()", list(args)


def measure_memory(bundle: Path, photos: dict[str, Path], product_id: str, original: str,
                   grocery_photo: str, methods: list[str], log=print) -> dict:
    """Peak RSS of each kind of process, in MiB."""
    rows = []

    def add(what: str, child: tuple[str, list[str]], note: str = "", ok=(0,)) -> dict:
        rc, peak, out = _run(*child, ok=ok)
        extra = {}
        if out.strip().startswith("{"):
            extra = json.loads(out.strip().splitlines()[-1])
        row = {"what": what, "peak_rss_mib": round(peak, 1), "note": note, **extra}
        rows.append(row)
        log(f"  {what:52s} peak RSS {peak:7.1f} MiB {note}")
        return row

    add("python + numpy + Pillow (floor)", ("import numpy, PIL.Image", []))
    for label, path in photos.items():
        add(f"`auditlens verify` {label} JPEG", (CLI, ["verify", str(path), "--product", product_id,
                                                      "--bundle", str(bundle)]),
            ok=(0, 1, 3))  # `verify` exits 1 for NO MATCH and 3 for RETAKE
    add("engine: Verifier + 20 verifies of the 12 MP JPEG",
        _child("engine", "--bundle", str(bundle), "--photo", str(photos["12 MP"]),
               "--product", product_id, "--repeat", "20"))
    size = pixel_size([grocery_photo])
    peaks: dict[str, dict[str, float]] = {"photo": {}, "12 MP": {}}
    for name in methods:
        for label, photo, shown in (("photo", grocery_photo, f"{size} photo"),
                                    ("12 MP", str(photos["12 MP"]), "12 MP JPEG")):
            row = add(f"method {name}: 1 reference + the same {shown} verified 5 times",
                      _child("method", name, "--bundle", str(bundle), "--original", original,
                             "--product", product_id, "--photo", photo))
            peaks[label][name] = row["peak_rss_mib"]
    return {"rows": rows, "photo_size": size, "per_method_peak_rss_mib": peaks["photo"],
            "per_method_peak_rss_mib_12mp": peaks["12 MP"]}


# -- children ------------------------------------------------------------------------------
def _vm(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _engine(args) -> None:
    from auditlens.device_app.verifier import Verifier

    verifier = Verifier(args.bundle)
    after_load = _vm("VmRSS")
    for _ in range(args.repeat):
        verifier.verify(args.photo, args.product)
    print(json.dumps({"rss_after_load_mib": round(after_load, 1),
                      "rss_after_verifies_mib": round(_vm("VmRSS"), 1)}))


def _method(args) -> None:
    from .peers import ProductRef, make_methods

    (method,) = make_methods(args.bundle, [args.name])
    method.setup()
    ref = method.prepare_reference(ProductRef(args.product, args.original))
    for _ in range(5):
        method.verify(args.photo, ref)
    print(json.dumps({"rss_after_mib": round(_vm("VmRSS"), 1)}))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.memory", description="memory-measurement children")
    sub = p.add_subparsers(dest="what", required=True)
    e = sub.add_parser("engine")
    e.add_argument("--bundle", required=True)
    e.add_argument("--photo", required=True)
    e.add_argument("--product", required=True)
    e.add_argument("--repeat", type=int, default=20)
    m = sub.add_parser("method")
    m.add_argument("name")
    m.add_argument("--bundle", required=True)
    m.add_argument("--original", required=True)
    m.add_argument("--product", required=True)
    m.add_argument("--photo", required=True)
    args = p.parse_args(argv)
    {"engine": _engine, "method": _method}[args.what](args)


if __name__ == "__main__":
    main()
