"""Turn public product-photo datasets into auditlens catalogues and labelled-photo CSVs.

Only the Grocery Store Dataset layout is known for now (``grocery-dev``: studio "iconic"
originals, in-store smartphone photos, ``classes.csv``, ``train.txt``/``val.txt``).
"""

from __future__ import annotations

import csv
import os
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path

from auditlens.catalog import check_product_id
from auditlens.errors import CatalogError, OutputPathError
from auditlens.files import atomic_write, check_output_dir

SPLITS = ("train", "val", "test")
"""The photo listings of the dataset, in the order they are read; each becomes SPLIT.csv."""
REQUIRED_SPLITS = ("train", "val")
CATALOG_HEADER = ["product_id", "image", "name", "group", "kind"]
PHOTOS_HEADER = ["photo", "product_id"]
_WHOLE = re.compile(r"[0-9]+")
_SHOWN = 5
"""How many product names a summary lists before "and N more" (paths: 3, they are long)."""


@dataclass(frozen=True)
class _Class:
    line: int
    name: str
    class_id: int
    group: str
    iconic: str
    """Iconic image path inside the dataset folder, with '/' separators."""
    kind: str


def import_grocery(root: str | Path, out_dir: str | Path, *, absolute_paths: bool = False,
                   verbose: bool = False) -> dict[str, Path]:
    """Write ``catalog.csv``, ``train.csv`` and ``val.csv`` (and ``test.csv``) for a
    Grocery Store Dataset copy.

    Paths inside the CSVs are relative to ``out_dir`` (symlinks kept as written), so the
    dataset and the CSVs can move together; ``absolute_paths`` writes absolute ones.
    Every listing is read and checked, and every file it names looked for, before any CSV
    is written: a line that cannot be read is a :class:`CatalogError` naming it, and leaves
    the folder as it was. Split CSVs of an earlier import that this one does not write are
    removed (they would describe another dataset); a file of that name that is no photo
    list as an import writes it (header ``photo,product_id``) is kept; a catalog.csv or split
    CSV the import would replace that it did not write (another header) is refused, and a
    photo listed in two splits (one of them train), under two products or twice in a split,
    or a train or val listing of no photo, is a :class:`CatalogError`. ``verbose`` prints what was written:
    photos per split and the products without a photo in it. Returns the paths.
    """
    root = Path(root)
    if not root.is_dir():
        raise CatalogError(f"{root}: " + ("this is a file; give the dataset's folder (the one holding "
                                           "classes.csv, train.txt and val.txt)" if root.exists() else
                                           "no such folder"))
    out = check_output_dir(out_dir)
    classes = _listing(root, "classes.csv")
    if classes is None:
        raise CatalogError(f"{root}: no classes.csv; is this the Grocery Store Dataset?")
    products = _read_classes(classes)
    by_id = {c.class_id: c.name for c in products}
    listings: dict[str, Path] = {}
    photos: dict[str, list[tuple[int, str, str]]] = {}
    for split in SPLITS:
        listing = _listing(root, f"{split}.txt")
        if listing is None:
            if split in REQUIRED_SPLITS:
                raise CatalogError(f"{root}: no {split}.txt (the listing of the {split} photos); the "
                                   "Grocery Store Dataset has train.txt and val.txt, and test.txt optionally")
            continue
        listings[split] = listing
        photos[split] = _read_split(listing, by_id)
    _check_splits(listings, photos)
    _check_files(root, [(f"{classes.name}, line {c.line}", c.iconic) for c in products]
                 + [(f"{listings[split].name}, line {line}", path)
                    for split, rows in photos.items() for line, path, _ in rows])

    headers = {"catalog": CATALOG_HEADER, **{split: PHOTOS_HEADER for split in photos}}
    foreign = [out / f"{name}.csv" for name, header in headers.items()
               if (out / f"{name}.csv").exists() and _first_line(out / f"{name}.csv") != ",".join(header)]
    if foreign:  # e.g. a catalogue edited by hand, with columns an import does not write
        raise OutputPathError(f"{', '.join(map(str, foreign))}: not written by an import (another header); "
                              "the import would replace it: move it away or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    prefix = _prefix(root, out, absolute_paths)
    tables = {"catalog": [[c.name, _join(prefix, c.iconic), c.name.replace("-", " "), c.group, c.kind]
                          for c in products]}
    for split, rows in photos.items():
        tables[split] = [[_join(prefix, path), pid] for _, path, pid in rows]
    written = {}
    for name, rows in tables.items():
        with atomic_write(out / f"{name}.csv", newline="") as fo:
            writer = csv.writer(fo, lineterminator="\n")
            writer.writerow(headers[name])
            writer.writerows(rows)
        written[name] = out / f"{name}.csv"
    removed, kept = [], []
    for split in SPLITS:
        stale = out / f"{split}.csv"
        if split not in written and stale.is_file():
            if _first_line(stale) == ",".join(PHOTOS_HEADER):  # as an import writes it
                stale.unlink()
                removed.append(stale)
            else:
                kept.append(stale)
    if verbose:
        names = [c.name for c in products]
        print(f"{'catalog':8s} {written['catalog']}  ({len(names)} products)")
        for split, rows in photos.items():
            print(f"{split:8s} {written[split]}  ({len(rows)} photos; {_without(names, rows)})")
        for stale in removed:
            print(f"removed  {stale}: an earlier import's; {root} has no {stale.stem}.txt")
        for other in kept:
            print(f"kept     {other}: not a photo list as an import writes it; {root} has no {other.stem}.txt")
    return written


def _read_classes(classes: Path) -> list[_Class]:
    """The products of ``classes.csv``; only its first line may be a header (a class id
    cell without a digit), and any other row that is not a product is refused."""
    products: list[_Class] = []
    first_of_name: dict[str, _Class] = {}
    first_of_id: dict[int, _Class] = {}
    for line, row in enumerate(csv.reader(_lines(classes)), 1):
        if not "".join(row).strip():
            continue  # a blank line
        parts = [c.strip() for c in row]
        if line == 1 and len(parts) > 1 and parts[1] and not re.search(r"[0-9]", parts[1]):
            continue  # the header
        why = _malformed_class(parts)
        if why:
            raise CatalogError(f"{classes}, line {line}: expected class name, class id, coarse class "
                               f"name, coarse class id, iconic image path (iconic/KIND/...), got {row!r}: "
                               f"{why}")
        name, class_id, group, iconic = parts[0], int(parts[1]), parts[2], _dataset_path(parts[4])
        check_product_id(name, f"{classes}, line {line}: the class name is the product id, and it is an ")
        if name in first_of_name:
            raise CatalogError(f"{classes}, lines {first_of_name[name].line} and {line}: the class name "
                               f"{name!r} appears twice; it is the product id, which names one product")
        if class_id in first_of_id:
            other = first_of_id[class_id]
            raise CatalogError(f"{classes}, lines {other.line} and {line}: the class id {class_id} is given "
                               f"to both {other.name!r} and {name!r}; the photos listed with it would "
                               "be labelled as one of them")
        product = _Class(line, name, class_id, group, iconic, iconic.split("/")[1])
        first_of_name[name] = first_of_id[class_id] = product
        products.append(product)
    if not products:
        raise CatalogError(f"{classes}: no products (a header at most); expected one row per product: "
                           "class name, class id, coarse class name, coarse class id, iconic image path")
    return products


def _malformed_class(parts: list[str]) -> str:
    """Why a row of ``classes.csv`` is not a product, or ''."""
    if len(parts) < 5:
        return f"{len(parts)} cell(s), not 5 or more"
    if not parts[0]:
        return "no class name"
    for cell, what in ((parts[1], "class id"), (parts[3], "coarse class id")):
        if not _WHOLE.fullmatch(cell):
            return f"the {what} {cell!r} is not a whole number"
    iconic = _dataset_path(parts[4])
    if iconic is None:
        return f"the iconic image path {parts[4]!r} leads outside the dataset folder"
    if len(iconic.split("/")) < 2:
        return f"the iconic image path {parts[4]!r} names no KIND folder (iconic/KIND/...)"
    return ""


def _read_split(listing: Path, by_id: dict[int, str]) -> list[tuple[int, str, str]]:
    """``(line, photo path in the dataset, product id)`` for each photo of a split listing."""
    rows = []
    for line, text in enumerate(_lines(listing), 1):
        if not text.strip():
            continue
        parts = [p.strip() for p in text.split(",")]
        if len(parts) < 2 or not parts[0] or not _WHOLE.fullmatch(parts[1]) or int(parts[1]) not in by_id:
            raise CatalogError(f"{listing}, line {line}: expected PHOTO_PATH, CLASS_ID[, COARSE_ID] "
                               f"with a class id of classes.csv, got {text.strip()!r}")
        path = _dataset_path(parts[0])
        if path is None:
            raise CatalogError(f"{listing}, line {line}: the photo path {parts[0]!r} leads outside the "
                               "dataset folder; listings name photos inside it")
        rows.append((line, path, by_id[int(parts[1])]))
    return rows


def _check_splits(listings: dict[str, Path], photos: dict[str, list[tuple[int, str, str]]]) -> None:
    """Refuse a split listing no photo, and a photo listed twice: in the train split and
    another (it would be validated on what it was trained on), under two products, or twice
    in one split."""
    for split, rows in photos.items():
        if not rows and split in REQUIRED_SPLITS:
            raise CatalogError(f"{listings[split]}: lists no photo")
    first: dict[str, tuple[str, int, str]] = {}
    for split, rows in photos.items():
        for line, path, pid in rows:
            if path not in first:
                first[path] = (split, line, pid)
                continue
            split0, line0, pid0 = first[path]
            if pid0 != pid:
                why = f"as {pid0} and as {pid}: one label is wrong"
            elif split0 == split:
                why = "twice: it would count double"
            elif "train" in (split0, split):
                why = f"in the {split0} and the {split} split: it would be validated on a photo it trained on"
            else:  # in val and test: both only evaluate
                continue
            where = f"{listings[split0].name}, line {line0}, and {listings[split].name}, line {line}"
            raise CatalogError(f"{path} is listed {why} ({where}); correct the listings")


def _dataset_path(text: str) -> str | None:
    """A path of a listing as a path inside the dataset folder, with '/' separators (a
    leading '/' means the dataset's top folder, as in classes.csv; '\\' is a Windows
    separator), or None where it climbs out of the folder."""
    path = posixpath.normpath(text.replace("\\", "/").lstrip("/") or ".")
    return None if path == ".." or path.startswith("../") else path


def _check_files(root: Path, named: list[tuple[str, str]]) -> None:
    """Refuse when a file ``(where, path)`` names is not a file in ``root``, listing the
    first few and how many; a name that differs from one on disk only in case is pointed out."""
    missing = [(where, path) for where, path in named if not (root / path).is_file()]
    if not missing:
        return
    shown = "; ".join(f"{where}: {path}" for where, path in missing[:3])
    more = f"; and {len(missing) - 3} more" if len(missing) > 3 else ""
    hint = ""
    folders: dict[Path, dict[str, list[str]]] = {}
    for where, path in missing:
        found = _case_insensitive(root, path, folders)
        if found:
            hint = (f". {where} names {path}, and {found} is there: names are case-sensitive here; "
                    "rename the file or folder, or correct the listing")
            break
    raise CatalogError(f"{root}: {len(missing)} of the {len(named)} files named in classes.csv and the "
                       f"split listings are not there ({shown}{more}){hint}")


def _case_insensitive(root: Path, path: str, folders: dict[Path, dict[str, list[str]]]) -> str | None:
    """The file inside ``root`` whose path differs from ``path`` only in case, or None;
    ``folders`` keeps the folders' listings between calls."""
    here = root
    for part in path.split("/"):
        if (here / part).exists():
            here = here / part
            continue
        if here not in folders:
            try:
                names = os.listdir(here)
            except OSError:
                return None
            folders[here] = {}
            for name in sorted(names):
                folders[here].setdefault(name.lower(), []).append(name)
        matches = folders[here].get(part.lower())
        if not matches:
            return None
        here = here / matches[0]
    return here.relative_to(root).as_posix() if here.is_file() else None


def _listing(root: Path, name: str) -> Path | None:
    """The file ``name`` in ``root``, matched regardless of case ("VAL.TXT"), or None."""
    if (root / name).is_file():
        return root / name
    found = sorted(p for p in root.iterdir() if p.name.lower() == name and p.is_file())
    if len(found) > 1:
        raise CatalogError(f"{root}: {', '.join(p.name for p in found)} differ only in case; "
                           f"keep one {name}")
    return found[0] if found else None


def _prefix(root: Path, out: Path, absolute: bool) -> str:
    """How the CSVs in ``out`` name the dataset folder ``root``: relative to ``out`` (or
    absolute), symlinks kept as written, unless the path as written leads elsewhere (a
    '..' after a symlink), where the resolved paths are used."""
    written = Path(os.path.abspath(root))
    if not _same(written, root):
        written = root.resolve()
    if absolute:
        return str(written)
    try:
        relative = os.path.relpath(written, os.path.abspath(out))
        if not _same(out / relative, root):  # --out reached through a symlink, say
            relative = os.path.relpath(root.resolve(), out.resolve())
    except ValueError:  # on another drive (Windows): no relative path leads there
        return str(written)
    return relative


def _same(a: Path, b: Path) -> bool:
    """Whether ``a`` leads to ``b`` (a path that leads nowhere does not)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _join(prefix: str, path: str) -> str:
    """``path`` inside the dataset as the CSVs write it."""
    joined = Path(prefix) / path
    return str(joined) if joined.is_absolute() else joined.as_posix()


def _without(names: list[str], rows: list[tuple[int, str, str]]) -> str:
    """'photos of every product', or how many products have no photo and the first few."""
    seen = {pid for _, _, pid in rows}
    none = [n for n in names if n not in seen]
    if not none:
        return "photos of every product"
    more = f" and {len(none) - _SHOWN} more" if len(none) > _SHOWN else ""
    return f"no photo of {len(none)} of the {len(names)} products: {', '.join(none[:_SHOWN])}{more}"


def _first_line(path: Path) -> str:
    try:
        with path.open(encoding="utf-8", errors="replace") as fh:
            return fh.readline().strip()
    except OSError:
        return ""


def _lines(path: Path) -> list[str]:
    """The lines of a UTF-8 listing, or a :class:`CatalogError` that says which file is not."""
    try:
        return path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as exc:
        raise CatalogError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); "
                           "save it as UTF-8") from exc
    except OSError as exc:
        raise CatalogError(f"{path}: cannot read it: {exc.strerror or exc}") from exc
