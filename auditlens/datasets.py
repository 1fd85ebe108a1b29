"""Turn public product-photo datasets into auditlens catalogues and labelled-photo CSVs.

Only the Grocery Store Dataset layout is known for now (``grocery-dev``: studio "iconic"
originals, in-store smartphone photos, ``classes.csv``, ``train.txt``/``val.txt``).
"""

from __future__ import annotations

import csv
from pathlib import Path

from auditlens.errors import CatalogError
from auditlens.files import atomic_write


def import_grocery(root: str | Path, out_dir: str | Path) -> dict[str, Path]:
    """Write ``catalog.csv``, ``train.csv`` and ``val.csv`` for a Grocery Store Dataset copy.

    Paths inside the CSVs are absolute, so the CSVs can live anywhere. Returns their paths.
    """
    root = Path(root).resolve()
    out = Path(out_dir)
    classes = root / "classes.csv"
    if not classes.is_file():
        raise CatalogError(f"{root}: no classes.csv; is this the Grocery Store Dataset?")
    out.mkdir(parents=True, exist_ok=True)
    by_class: dict[str, str] = {}
    # every CSV is written whole or not at all: a bad line leaves no half catalogue behind
    with classes.open(newline="", encoding="utf-8") as fh, atomic_write(out / "catalog.csv", newline="") as fo:
        writer = csv.writer(fo)
        writer.writerow(["product_id", "image", "name", "group", "kind"])
        for line, row in enumerate(csv.reader(fh), 1):
            if not "".join(row).strip() or (len(row) > 1 and not row[1].strip().isdigit()):
                continue  # blank line or the header
            parts = [c.strip() for c in row]
            iconic_parts = parts[4].strip("/").split("/") if len(parts) >= 5 else []
            if len(iconic_parts) < 2:
                raise CatalogError(f"{classes}, line {line}: expected class name, class id, coarse class "
                                   f"name, coarse class id, iconic image path (iconic/KIND/...), got {row!r}")
            name, class_id, group, _, iconic = parts[:5]
            by_class[class_id] = name
            writer.writerow([name, str(root / iconic.lstrip("/")), name.replace("-", " "), group,
                             iconic_parts[1]])
    written = {"catalog": out / "catalog.csv"}
    for split in ("train", "val", "test"):
        listing = root / f"{split}.txt"
        if not listing.is_file():
            continue
        with listing.open(encoding="utf-8") as fh, atomic_write(out / f"{split}.csv", newline="") as fo:
            writer = csv.writer(fo)
            writer.writerow(["photo", "product_id"])
            for line in fh:
                parts = [p.strip() for p in line.split(",")]
                if len(parts) >= 2 and parts[1] in by_class:
                    writer.writerow([str(root / parts[0]), by_class[parts[1]]])
        written[split] = out / f"{split}.csv"
    return written
