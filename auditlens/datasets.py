"""Turn public product-photo datasets into auditlens catalogues and labelled-photo CSVs.

Only the Grocery Store Dataset layout is known for now (``grocery-dev``: studio "iconic"
originals, in-store smartphone photos, ``classes.csv``, ``train.txt``/``val.txt``).
"""

from __future__ import annotations

import csv
from pathlib import Path

from auditlens.errors import CatalogError


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
    with classes.open(newline="", encoding="utf-8") as fh, (out / "catalog.csv").open("w", newline="") as fo:
        writer = csv.writer(fo)
        writer.writerow(["product_id", "image", "name", "group", "kind"])
        for row in csv.reader(fh):
            if not row or not row[1].strip().isdigit():
                continue  # header
            name, class_id, group, _, iconic = (c.strip() for c in row[:5])
            kind = iconic.strip("/").split("/")[1]
            by_class[class_id] = name
            writer.writerow([name, str(root / iconic.lstrip("/")), name.replace("-", " "), group, kind])
    written = {"catalog": out / "catalog.csv"}
    for split in ("train", "val", "test"):
        listing = root / f"{split}.txt"
        if not listing.is_file():
            continue
        with listing.open(encoding="utf-8") as fh, (out / f"{split}.csv").open("w", newline="") as fo:
            writer = csv.writer(fo)
            writer.writerow(["photo", "product_id"])
            for line in fh:
                parts = [p.strip() for p in line.split(",")]
                if len(parts) >= 2 and parts[1] in by_class:
                    writer.writerow([str(root / parts[0]), by_class[parts[1]]])
        written[split] = out / f"{split}.csv"
    return written
