"""Read product catalogues from where companies keep them.

Three sources, one result (:class:`Catalog`):

* a folder of images, the file stem being the product id (``milk-1l.jpg``);
* a CSV with columns ``product_id,image`` and optional ``name,group,kind,code``
  (image paths are relative to the CSV's folder);
* a SQLite database, ``sqlite:///catalog.db`` or ``sqlite:///catalog.db?table=products``,
  with columns ``product_id``, ``name`` and ``image`` (a BLOB of the encoded image, or a
  path), and optionally ``group``/``kind``/``code``.

``group`` is the coarse class (another brand of milk is a hard impostor), ``kind`` the
broad product kind (packaged, fruit, ...), ``code`` a barcode or QR payload.

Invalid entries (duplicate ids, ids with path characters, missing images) raise
:class:`~auditlens.errors.CatalogError` naming the product; nothing is skipped silently.
"""

from __future__ import annotations

import csv
import json
import re
import sqlite3
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs

from PIL import Image

from auditlens.errors import CatalogError, ImageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
PRODUCT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}$")
"""Product ids: letters, digits and ``. _ : @ + -``; no slashes, spaces or control chars."""


def check_product_id(product_id: str, where: str = "") -> str:
    """Return ``product_id`` if it is a safe id, else raise :class:`CatalogError`."""
    if not isinstance(product_id, str) or not PRODUCT_ID.match(product_id) or ".." in product_id:
        raise CatalogError(
            f"{where}invalid product id {product_id!r}: use 1-128 letters, digits or "
            "'. _ : @ + -', starting with a letter or digit (no '/', '\\', '..' or spaces)"
        )
    return product_id


@dataclass(frozen=True)
class Product:
    """One catalogue entry: the product and its original image."""

    product_id: str
    name: str
    image: str | bytes
    """Path of the original image, or its encoded bytes (SQLite BLOB)."""
    group: str = ""
    """Coarse class, e.g. 'Milk'; products of one group are each other's hard impostors."""
    kind: str = ""
    """Broad kind, e.g. 'Packages', 'Fruit', 'Vegetables' (for per-kind reports)."""
    code: str = ""
    """Barcode or QR payload printed on the product, if known."""

    def open(self, **load_kwargs) -> Image.Image:
        """Load the original as upright RGB; errors name the product id."""
        from auditlens.device_app.imaging import load_image

        try:
            return load_image(self.image, **load_kwargs)
        except ImageError as exc:
            raise CatalogError(f"product {self.product_id!r}: original unusable: {exc}") from exc


class Catalog(Sequence[Product]):
    """An ordered, id-unique list of products."""

    def __init__(self, products: Sequence[Product], source: str = "", notes: Sequence[str] = ()) -> None:
        self.source = source
        self.notes = list(notes)
        """What the reader left unread and a person should know (columns it does not know)."""
        self._products = list(products)
        self._index: dict[str, int] = {}
        for i, product in enumerate(self._products):
            check_product_id(product.product_id, f"{source}: " if source else "")
            if product.product_id in self._index:
                raise CatalogError(
                    f"{source}: product id {product.product_id!r} appears more than once"
                )
            self._index[product.product_id] = i
        by_case: dict[str, str] = {}
        for product in self._products:
            first = by_case.setdefault(product.product_id.casefold(), product.product_id)
            if first != product.product_id:  # allowed (ids are case-sensitive), but rarely meant
                self.notes.append(f"{source}: product ids {first!r} and {product.product_id!r} differ only in "
                                  "case: they are two products, and a field auditor picks one by its id")
        codes: dict[str, str] = {}
        for product in self._products:
            if product.code and codes.setdefault(product.code, product.product_id) != product.product_id:
                raise CatalogError(
                    f"{source}: products {codes[product.code]!r} and {product.product_id!r} "
                    f"have the same code {product.code!r}; a scanned code must name one product"
                )
        if not self._products:
            raise CatalogError(f"{source}: the catalogue holds no products")

    def __len__(self) -> int:
        return len(self._products)

    def __getitem__(self, i):  # type: ignore[override]
        return self._products[i]

    def __iter__(self) -> Iterator[Product]:
        return iter(self._products)

    def __contains__(self, product_id: object) -> bool:
        return product_id in self._index

    @property
    def ids(self) -> list[str]:
        return [p.product_id for p in self._products]

    def get(self, product_id: str) -> Product:
        try:
            return self._products[self._index[product_id]]
        except KeyError:
            raise CatalogError(f"{self.source}: no product {product_id!r} in the catalogue") from None

    def subset(self, product_ids: Sequence[str]) -> Catalog:
        return Catalog([self.get(p) for p in product_ids], self.source)


def _read_folder(folder: Path) -> Catalog:
    # hidden files are not products: macOS leaves a "._NAME.jpg" beside every copied image
    files = sorted(p for p in folder.iterdir()
                   if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file())
    if not files:
        nested = sorted(d.name + "/" for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")
                        and any(f.suffix.lower() in IMAGE_SUFFIXES for f in d.iterdir()))
        raise CatalogError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder"
                           + (f"; subfolders ({', '.join(nested[:3])}{', ...' if len(nested) > 3 else ''}) "
                              "are not read: a catalogue folder holds one image per product, or use a "
                              "CSV (product_id,image,...)" if nested else ""))
    stems: dict[str, Path] = {}
    for f in files:
        if f.stem in stems:
            raise CatalogError(f"{folder}: product id {f.stem!r} has two images: {stems[f.stem].name}, {f.name}")
        stems[f.stem] = f
    return Catalog([Product(f.stem, f.stem, str(f)) for f in files], str(folder))


def _csv_rows(fh, path: Path, required: tuple[str, ...], expected: str,
              known: tuple[str, ...] | None = None) -> tuple[list[tuple[int, dict]], list[str]]:
    """The rows of a CSV with the line each starts on (blank lines count), keyed by its
    header's names stripped and lower-cased ("Product_ID", " image"); a file separated by
    semicolons or tabs (a spreadsheet's export in many locales) is read as such. A header
    without the ``required`` columns is refused, quoting it. Also returns the header's
    names, as written, that are not ``known`` (none when ``known`` is None)."""
    header = fh.readline()
    fh.seek(0)
    reader = csv.DictReader(fh, delimiter=max(",;\t", key=header.count))  # ties: a comma
    found = list(reader.fieldnames or ())
    reader.fieldnames = [(name or "").strip().lower() for name in found]
    missing = [c for c in required if c not in reader.fieldnames]
    if missing:
        raise CatalogError(f"{path}: missing column(s) {', '.join(missing)}; expected {expected}, "
                           f"found the header {header.strip()[:200]!r}")
    unknown = [raw.strip() for raw, name in zip(found, reader.fieldnames)
               if known is not None and name and name not in known]
    rows = []
    for row in reader:
        extra = row.get(None)  # DictReader keeps fields past the header's under None
        if extra is not None and any(str(v).strip() for v in extra):
            raise CatalogError(
                f"{path}:{reader.line_num}: {len(found) + len(extra)} fields where the header has {len(found)} "
                f"(the extra: {', '.join(map(repr, extra))[:200]}): a comma inside a value? Quote the value "
                "(\"Lemon,Big\") or remove the comma")
        rows.append((reader.line_num, row))
    return rows, unknown


CSV_COLUMNS = ("product_id", "image", "name", "group", "kind", "code")
"""The columns a catalogue CSV is read by (header names compared stripped, in lower case)."""


def _read_csv(path: Path) -> Catalog:
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:  # -sig: Excel's BOM
            rows, unread = _csv_rows(fh, path, ("product_id", "image"), "product_id,image[,name,group,kind,code]",
                                     known=CSV_COLUMNS)
    except UnicodeDecodeError as exc:
        raise CatalogError(f"{path}: not UTF-8 text ({exc}); save the CSV as UTF-8") from exc
    except (OSError, csv.Error) as exc:
        raise CatalogError(f"{path}: cannot read the catalogue CSV: {exc}") from exc
    notes = [f"{path}: column(s) {', '.join(map(repr, unread))} not read: a catalogue's columns are "
             f"{', '.join(CSV_COLUMNS)} (products that look alike share a 'group')"] if unread else []
    products = []
    for line, row in rows:
        pid = (row.get("product_id") or "").strip()
        check_product_id(pid, f"{path}:{line}: ")
        image = (row.get("image") or "").strip()
        if not image:
            raise CatalogError(f"{path}:{line}: product {pid!r} has no image")
        products.append(Product(
            pid, (row.get("name") or pid).strip(), _csv_file(row.get("image"), path.parent),
            (row.get("group") or "").strip(), (row.get("kind") or "").strip(),
            (row.get("code") or "").strip(),
        ))
    return Catalog(products, str(path), notes)


def _read_sqlite(url: str) -> Catalog:
    # sqlite:///relative/path.db or sqlite:////absolute/path.db, optional ?table=NAME
    if not url.startswith("sqlite:///"):
        raise CatalogError(f"{url}: write SQLite catalogues as sqlite:///path/to/catalog.db")
    location, _, query = url[len("sqlite:///"):].partition("?")
    db_path = Path(location)
    table = parse_qs(query).get("table", ["products"])[0]
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", table):
        raise CatalogError(f"{url}: invalid table name {table!r}")
    if not db_path.is_file():
        raise CatalogError(f"{url}: no SQLite database at {db_path}")
    try:
        # as_uri percent-quotes '#', '%', '?' and spaces, which a file: URI would misread
        con = sqlite3.connect(f"{db_path.absolute().as_uri()}?mode=ro", uri=True)
        con.text_factory = bytes  # decode ourselves, to name the product on bad UTF-8
        try:
            cols = [r[1].decode() for r in con.execute(f'PRAGMA table_info("{table}")')]
            if not cols:
                raise CatalogError(f"{url}: no table {table!r} in {db_path}")
            missing = {"product_id", "name", "image"} - set(cols)
            if missing:
                raise CatalogError(
                    f"{url}: table {table!r} lacks column(s) {', '.join(sorted(missing))}; "
                    "expected product_id, name, image[, group, kind, code]"
                )
            extra = [c for c in ("group", "kind", "code") if c in cols]
            select = ", ".join(f'"{c}"' for c in ["product_id", "name", "image", *extra])
            rows = con.execute(
                f'SELECT typeof("image"), {select} FROM "{table}" ORDER BY rowid'
            ).fetchall()
        finally:
            con.close()
    except sqlite3.DatabaseError as exc:
        raise CatalogError(f"{url}: cannot read the database: {exc}") from exc

    def text(value, what: str, pid: str) -> str:
        if value is None:
            return ""
        if isinstance(value, bytes):
            try:
                return value.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise CatalogError(f"{url}: product {pid!r}: {what} is not UTF-8 text") from exc
        return str(value)

    products = []
    for image_type, raw_id, raw_name, image, *raw_extra in rows:
        pid = text(raw_id, "product_id", repr(raw_id))
        check_product_id(pid, f"{url}: ")
        if image is None or image == b"":
            raise CatalogError(f"{url}: product {pid!r} has no image")
        if image_type == b"blob":
            original: str | bytes = bytes(image)
        else:
            rel = Path(text(image, "image path", pid))
            original = str(rel if rel.is_absolute() else db_path.parent / rel)
        fields = {c: text(v, c, pid) for c, v in zip(extra, raw_extra)}
        products.append(Product(
            pid, text(raw_name, "name", pid) or pid, original,
            fields.get("group", ""), fields.get("kind", ""), fields.get("code", ""),
        ))
    return Catalog(products, url)


def open_catalog(source: str | Path) -> Catalog:
    """Open a catalogue: a folder of images, a ``.csv`` file or ``sqlite:///path.db``."""
    text = str(source)
    if text.startswith("sqlite:"):
        return _read_sqlite(text)
    path = Path(source)
    if path.is_dir():
        return _read_folder(path)
    if path.is_file() and path.suffix.lower() == ".csv":
        return _read_csv(path)
    if path.is_file() and path.suffix.lower() in (".db", ".sqlite", ".sqlite3"):
        return _read_sqlite(f"sqlite:///{path}")
    if not path.exists():
        raise CatalogError(f"{source}: no such file or folder (a catalogue is a folder of images, "
                           "a .csv file or sqlite:///path.db)")
    raise CatalogError(f"{source}: not a folder of images, a .csv file or sqlite:///path.db")


@dataclass(frozen=True)
class LabelledPhoto:
    """A field photo and the product it truly shows (for training and evaluation)."""

    photo: str
    product_id: str
    given: str = field(default="", compare=False)
    """The photo as the CSV wrote it (``photo`` is resolved against the CSV's folder), for
    outputs that are joined back to their input."""
    decision: str = field(default="", compare=False)
    """The audit log's verdict, when the CSV is ``verify-log --export-photos``'s (its
    ``decision`` column); its product_id is then the product *claimed*, not yet checked."""


def unchecked_verdicts(photos: list[LabelledPhoto]) -> str | None:
    """A warning when labelled photos from an audit-log export still hold verdicts other than
    MATCH: such a photo may show another product (NO MATCH) or be unusable (RETAKE), and as
    a reference or a calibration pair it would teach the bundle that. None when none do."""
    left = Counter(p.decision for p in photos if p.decision and p.decision != "match")
    if not left:
        return None
    counts = ", ".join(f"{n} {d.upper().replace('_', ' ')}" for d, n in sorted(left.items()))
    return (f"{left.total()} rows are audit-log verdicts other than MATCH ({counts}): keep a "
            "row only once someone has checked that its photo shows its product, and delete "
            "RETAKE rows (README, \"Using the app\")")


def read_labelled_photos(path: str | Path) -> list[LabelledPhoto]:
    """Read a ``photo,product_id`` CSV; relative photo paths are resolved against its folder."""
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            rows, _ = _csv_rows(fh, path, ("photo", "product_id"), "photo,product_id")
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise CatalogError(f"{path}: cannot read labelled photos: {exc}") from exc
    out = []
    for line, row in rows:
        photo = (row["photo"] or "").strip()
        pid = (row["product_id"] or "").strip()
        if not photo or not pid:
            raise CatalogError(f"{path}:{line}: empty photo or product_id")
        out.append(LabelledPhoto(_csv_file(row["photo"], path.parent), pid, photo,
                                 (row.get("decision") or "").strip().lower()))
    return out


def read_product_ids(path: str | Path) -> set[str]:
    """Product ids from a file: one per line (``#`` comments allowed; a CSV's first column,
    under a ``product_id`` or ``id`` header), or JSON (a list, or an object with
    ``held_out_products``, at the top or under ``data`` as in the report.json that
    ``auditlens train`` writes)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CatalogError(f"{path}: cannot read product ids: {exc}") from exc
    if path.suffix.lower() == ".json" or text.lstrip().startswith(("[", "{")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CatalogError(f"{path}: not valid JSON: {exc}") from exc
        if isinstance(data, dict):  # a training report: held_out_products, maybe under "data"
            nested = data.get("data") if isinstance(data.get("data"), dict) else {}
            data = next((d[k] for d in (data, nested) for k in ("held_out_products", "unseen_products")
                         if k in d), None)
        if not isinstance(data, list):
            raise CatalogError(f"{path}: expected a JSON list of product ids or an object with "
                               "'held_out_products'")
        return {str(x).strip() for x in data if str(x).strip()}
    lines = [cell for cell in (line.split("#", 1)[0].split(",")[0].strip() for line in text.splitlines()) if cell]
    if lines and lines[0].casefold() in ("product_id", "id"):  # a CSV's header (e.g. a catalogue)
        lines = lines[1:]
    return set(lines)


def _csv_file(cell: str, folder: Path) -> str:
    """A file named in a CSV cell, resolved against the CSV's folder. Spaces around the name
    (``photo, product_id`` typed with a space after the comma) are dropped, unless the file's
    own name has them and only the name as written exists."""
    def resolve(name: str) -> Path:
        return Path(name) if Path(name).is_absolute() else folder / name
    stripped = resolve(cell.strip())
    if cell != cell.strip() and not stripped.exists() and resolve(cell).exists():
        return str(resolve(cell))
    return str(stripped)
