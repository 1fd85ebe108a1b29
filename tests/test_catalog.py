import sqlite3

import pytest

from auditlens.catalog import open_catalog, read_labelled_photos
from auditlens.errors import CatalogError

from .conftest import SAMPLE, product_image, write_csv


def test_folder_catalog_uses_file_stems(generated_catalog):
    cat = open_catalog(generated_catalog)
    assert cat.ids == [f"product-{i}" for i in range(6)]
    assert cat.get("product-3").open().size == (160, 160)


def test_csv_catalog_resolves_relative_paths_and_optional_columns():
    cat = open_catalog(SAMPLE / "catalog.csv")
    assert len(cat) == 10
    milk = cat.get("Arla-Standard-Milk")
    assert milk.group == "Milk" and milk.kind == "Packages"
    assert milk.open().mode == "RGB"


def test_sqlite_catalog_with_blobs_and_paths(tmp_path):
    product_image(1).save(tmp_path / "b.png")
    blob = (tmp_path / "a.png")
    product_image(2).save(blob)
    db = tmp_path / "catalog.db"
    con = sqlite3.connect(db)
    con.execute('CREATE TABLE products (product_id TEXT, name TEXT, image, "group" TEXT)')
    con.execute("INSERT INTO products VALUES ('a', 'Product A', ?, 'G')", (blob.read_bytes(),))
    con.execute("INSERT INTO products VALUES ('b', 'Product B', 'b.png', 'G')")
    con.commit()
    con.close()
    cat = open_catalog(f"sqlite:///{db}")
    assert cat.ids == ["a", "b"]
    assert isinstance(cat.get("a").image, bytes) and cat.get("b").image.endswith("b.png")
    assert cat.get("a").open().size == cat.get("b").open().size == (160, 160)
    assert cat.get("a").group == "G"


def test_sqlite_missing_columns_and_bad_utf8(tmp_path):
    db = tmp_path / "c.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE products (product_id TEXT, image BLOB)")
    con.commit()
    con.close()
    with pytest.raises(CatalogError, match="lacks column"):
        open_catalog(f"sqlite:///{db}")
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE items (product_id TEXT, name BLOB, image TEXT)")
    con.execute("INSERT INTO items VALUES ('x', ?, 'x.png')", (b"\xff\xfe bad",))
    con.commit()
    con.close()
    with pytest.raises(CatalogError, match="'x'.*not UTF-8"):
        open_catalog(f"sqlite:///{db}?table=items")


@pytest.mark.parametrize("bad_id", ["../etc", "a/b", "", "has space", "x\\y"])
def test_unsafe_product_ids_are_refused(tmp_path, bad_id):
    csv_path = write_csv(tmp_path / "c.csv", ["product_id", "image"], [[bad_id, "x.png"]])
    with pytest.raises(CatalogError, match="product id"):
        open_catalog(csv_path)


def test_duplicate_ids_are_refused(tmp_path):
    csv_path = write_csv(tmp_path / "c.csv", ["product_id", "image"], [["a", "x.png"], ["a", "y.png"]])
    with pytest.raises(CatalogError, match="more than once"):
        open_catalog(csv_path)


def test_missing_original_is_reported_by_product_id(tmp_path):
    csv_path = write_csv(tmp_path / "c.csv", ["product_id", "image"], [["milk-1l", "missing.jpg"]])
    with pytest.raises(CatalogError, match="milk-1l"):
        open_catalog(csv_path).get("milk-1l").open()


def test_labelled_photos_need_both_columns(tmp_path):
    with pytest.raises(CatalogError, match="product_id"):
        read_labelled_photos(write_csv(tmp_path / "p.csv", ["photo"], [["a.jpg"]]))
    photos = read_labelled_photos(SAMPLE / "photos.csv")
    assert photos and all(p.photo.startswith(str(SAMPLE)) for p in photos)


@pytest.mark.parametrize("folder", ["with#hash", "with%25percent", "with%pct", "with space"])
def test_sqlite_path_with_uri_characters(tmp_path, folder):
    """'#' and '%' in the path are quoted for SQLite's file: URI: the database is read,
    and no stray empty file appears where the path was cut at '#'."""
    root = tmp_path / folder
    root.mkdir()
    product_image(1).save(root / "a.png")
    db = root / "cat#1.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE items (product_id TEXT, name TEXT, image TEXT)")
    con.execute("INSERT INTO items VALUES ('a', 'Product A', 'a.png')")
    con.commit()
    con.close()
    before = sorted(p.name for p in tmp_path.rglob("*"))
    for source in (f"sqlite:///{db}?table=items", f"sqlite:///{db}"):
        if source.endswith(".db"):
            with pytest.raises(CatalogError, match="no table 'products'"):
                open_catalog(source)
        else:
            cat = open_catalog(source)
            assert cat.ids == ["a"] and cat.get("a").open().size == (160, 160)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_csv_errors_name_the_right_line_after_blank_lines(tmp_path):
    csv_path = tmp_path / "c.csv"
    csv_path.write_text("product_id,image\na,a.png\n\nb,b.png\n\n\"bad id\",c.png\n", encoding="utf-8")
    with pytest.raises(CatalogError, match=r"c\.csv:6: invalid product id 'bad id'"):
        open_catalog(csv_path)
    csv_path.write_text("product_id,image\n\n\na,\n", encoding="utf-8")
    with pytest.raises(CatalogError, match=r"c\.csv:4: product 'a' has no image"):
        open_catalog(csv_path)


def test_labelled_photo_errors_name_the_right_line_after_blank_lines(tmp_path):
    csv_path = tmp_path / "p.csv"
    csv_path.write_text("photo,product_id\na.jpg,a\n\n\nb.jpg,\n", encoding="utf-8")
    with pytest.raises(CatalogError, match=r"p\.csv:5: empty photo or product_id"):
        read_labelled_photos(csv_path)


@pytest.mark.parametrize("header, sep", [
    ("product_id, image", ","), ("Product_ID,Image", ","), ("product_id;image;name", ";"),
    ("product_id\timage", "\t"), ("\ufeffproduct_id,image", ","),
])
def test_csv_headers_as_spreadsheets_write_them_are_read(tmp_path, header, sep):
    product_image(1).save(tmp_path / "a.png")
    product_image(2).save(tmp_path / "b.png")
    extra = [sep + "A name"] if header.count(sep) == 2 else [""]
    lines = [header, f"A{sep}a.png{extra[0]}", f"B{sep}b.png{extra[0].replace('A name', 'B name')}"]
    (tmp_path / "catalog.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    cat = open_catalog(tmp_path / "catalog.csv")
    assert cat.ids == ["A", "B"] and cat.get("B").open().size == (160, 160)
    (tmp_path / "photos.csv").write_text(f"Photo{sep} Product_ID\na.png{sep}A\n", encoding="utf-8")
    assert [(p.product_id, p.photo) for p in read_labelled_photos(tmp_path / "photos.csv")] == [
        ("A", str(tmp_path / "a.png"))]


def test_a_csv_header_without_its_columns_is_quoted_in_the_error(tmp_path):
    (tmp_path / "catalog.csv").write_text("sku,file\nA,a.png\n", encoding="utf-8")
    with pytest.raises(CatalogError, match=r"missing column\(s\) product_id, image; expected "
                       r"product_id,image\[,name,group,kind,code\], found the header 'sku,file'"):
        open_catalog(tmp_path / "catalog.csv")


def test_a_catalogue_folder_skips_hidden_files_and_names_subfolders_it_does_not_read(tmp_path):
    folder = tmp_path / "originals"
    folder.mkdir()
    product_image(1).save(folder / "milk.png")
    (folder / "._milk.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # left by a Mac
    assert open_catalog(folder).ids == ["milk"]

    nested = tmp_path / "nested"
    for sub in ("dairy", "fruit"):
        (nested / sub).mkdir(parents=True)
        product_image(2).save(nested / sub / "item.png")
    with pytest.raises(CatalogError, match=r"no images .* subfolders \(dairy/, fruit/\) are not read"):
        open_catalog(nested)


def test_spaces_around_a_csv_file_name_are_dropped_unless_the_file_is_named_with_them(tmp_path):
    product_image(1).save(tmp_path / "a.png")
    product_image(2).save(tmp_path / "b.png ", format="PNG")  # its own name ends in a space
    (tmp_path / "photos.csv").write_text("photo,product_id\n a.png ,A\nb.png ,B\n", encoding="utf-8")
    assert [p.photo for p in read_labelled_photos(tmp_path / "photos.csv")] == [
        str(tmp_path / "a.png"), str(tmp_path / "b.png ")]
    (tmp_path / "catalog.csv").write_text("product_id,image\nA, a.png\nB,b.png \n", encoding="utf-8")
    cat = open_catalog(tmp_path / "catalog.csv")
    assert [cat.get(pid).open().size for pid in ("A", "B")] == [(160, 160)] * 2


def test_columns_a_catalogue_does_not_read_are_named_once(tmp_path, capsys):
    """A misnamed column ('category' for 'group') would silently leave every product
    without look-alikes: the catalogue notes each column it leaves unread, and enroll says so."""
    product_image(1).save(tmp_path / "a.png")
    product_image(2).save(tmp_path / "b.png")
    write_csv(tmp_path / "c.csv", ["product_id", "image", "Category", "price"],
              [["a", "a.png", "Milk", "1.99"], ["b", "b.png", "Milk", "2.49"]])
    catalog = open_catalog(tmp_path / "c.csv")
    assert [p.group for p in catalog] == ["", ""]
    assert len(catalog.notes) == 1 and "column(s) 'Category', 'price' not read" in catalog.notes[0]
    assert open_catalog(SAMPLE / "catalog.csv").notes == []
    write_csv(tmp_path / "first_row_blank.csv", ["product_id", "image", "category"], [["a", "a.png", ""]])
    assert "'category' not read" in open_catalog(tmp_path / "first_row_blank.csv").notes[0]  # by the header
    from auditlens.cli import main

    assert main(["enroll", str(tmp_path / "c.csv"), "--out", str(tmp_path / "b"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert err.count("not read: a catalogue's columns are product_id, image, name, group, kind, code") == 1


def test_a_row_with_more_fields_than_its_header_is_refused_not_cut(tmp_path):
    """An unquoted comma in an id (``Lemon,Big,originals/Lemon.jpg`` under a two-column
    header) used to drop the last field and report the image ``Big`` missing."""
    from auditlens.catalog import open_catalog, read_labelled_photos

    product_image(0).save(tmp_path / "Lemon.jpg")
    (tmp_path / "catalog.csv").write_text("product_id,image\nLemon,Big,Lemon.jpg\n")
    with pytest.raises(CatalogError, match=r"catalog.csv:2: 3 fields where the header has 2 .*Quote the value"):
        open_catalog(tmp_path / "catalog.csv")
    (tmp_path / "photos.csv").write_text("photo,product_id\nLemon.jpg,Lemon,Big\n")
    with pytest.raises(CatalogError, match=r"photos.csv:2: 3 fields where the header has 2"):
        read_labelled_photos(tmp_path / "photos.csv")
    (tmp_path / "trailing.csv").write_text("product_id,image\nLemon,Lemon.jpg,\n")  # an empty extra field
    assert [p.product_id for p in open_catalog(tmp_path / "trailing.csv")] == ["Lemon"]


def test_ids_that_differ_only_in_case_are_two_products_and_said_to_be(tmp_path):
    for i, name in enumerate(("Milk", "milk", "Juice")):
        product_image(i).save(tmp_path / f"{name}_{i}.png")
    (tmp_path / "catalog.csv").write_text("product_id,image\nMilk,Milk_0.png\nmilk,milk_1.png\nJuice,Juice_2.png\n")
    catalog = open_catalog(tmp_path / "catalog.csv")
    assert [p.product_id for p in catalog] == ["Milk", "milk", "Juice"]
    assert any("'Milk' and 'milk' differ only in case" in n for n in catalog.notes)
    assert not open_catalog(SAMPLE / "catalog.csv").notes
