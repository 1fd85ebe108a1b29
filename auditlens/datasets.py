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
    """Write ``catalog.csv``, ``train.csv`` and ``val.csv`` (and ``test.csv``) for a
    Grocery Store Dataset copy.

    Paths inside the CSVs are absolute, so the CSVs can live anywhere. Every listing is
    read and checked before any CSV is written: a line that cannot be read is a
    :class:`CatalogError` naming it, and leaves the folder as it was. Returns the paths.
    """
    root = Path(root).resolve()
    out = Path(out_dir)
    classes = root / "classes.csv"
    if not classes.is_file():
        raise CatalogError(f"{root}: no classes.csv; is this the Grocery Store Dataset?")
    by_class: dict[str, str] = {}
    catalog_rows = []
    for line, row in enumerate(csv.reader(_lines(classes)), 1):
        if not "".join(row).strip() or (len(row) > 1 and not row[1].strip().isdigit()):
            continue  # blank line or the header
        parts = [c.strip() for c in row]
        iconic_parts = parts[4].strip("/").split("/") if len(parts) >= 5 else []
        if len(iconic_parts) < 2:
            raise CatalogError(f"{classes}, line {line}: expected class name, class id, coarse class "
                               f"name, coarse class id, iconic image path (iconic/KIND/...), got {row!r}")
        name, class_id, group, _, iconic = parts[:5]
        by_class[class_id] = name
        catalog_rows.append([name, str(root / iconic.lstrip("/")), name.replace("-", " "), group,
                             iconic_parts[1]])
    tables = {"catalog": (["product_id", "image", "name", "group", "kind"], catalog_rows)}
    for split in ("train", "val", "test"):
        listing = root / f"{split}.txt"
        if not listing.is_file():
            continue
        rows = []
        for line, text in enumerate(_lines(listing), 1):
            if not text.strip():
                continue
            parts = [p.strip() for p in text.split(",")]
            if len(parts) < 2 or parts[1] not in by_class:
                raise CatalogError(f"{listing}, line {line}: expected PHOTO_PATH, CLASS_ID[, COARSE_ID] "
                                   f"with a class id of classes.csv, got {text.strip()!r}")
            rows.append([str(root / parts[0]), by_class[parts[1]]])
        tables[split] = (["photo", "product_id"], rows)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, (header, rows) in tables.items():
        with atomic_write(out / f"{name}.csv", newline="") as fo:
            writer = csv.writer(fo)
            writer.writerow(header)
            writer.writerows(rows)
        written[name] = out / f"{name}.csv"
    return written


def _lines(path: Path) -> list[str]:
    """The lines of a UTF-8 listing, or a :class:`CatalogError` that says which file is not."""
    try:
        return path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as exc:
        raise CatalogError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); "
                           "save it as UTF-8") from exc
    except OSError as exc:
        raise CatalogError(f"{path}: cannot read it: {exc.strerror or exc}") from exc
