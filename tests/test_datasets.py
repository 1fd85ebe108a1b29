"""import-grocery: a Grocery Store Dataset folder into catalog.csv and photo CSVs, refusing
what would mislabel photos or break the commands that read the CSVs later."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import pytest

from auditlens.catalog import open_catalog, read_labelled_photos
from auditlens.cli import main
from auditlens.datasets import import_grocery
from auditlens.errors import CatalogError

from .conftest import product_image

HEADER = ("Class Name (str),Class ID (int),Coarse Class Name (str),Coarse Class ID (int),"
          "Iconic Image Path (str),Product Description Path (str)")


def klass(name: str, class_id, group: str, group_id, kind: str) -> str:
    folder = f"/iconic-images-and-descriptions/{kind}/{group}/{name}"
    return f"{name},{class_id},{group},{group_id},{folder}/{name}_Iconic.jpg,{folder}/{name}_Description.txt"


CLASSES = [klass("Milk", 1, "Milk", 1, "Packages"), klass("Oat-Milk", 2, "Milk", 1, "Packages"),
           klass("Banana", 3, "Banana", 2, "Fruit")]
TRAIN = ["train/Packages/Milk/Milk_001.jpg, 1, 1", "train/Packages/Milk/Milk_002.jpg, 1, 1",
         "train/Packages/Oat-Milk/Oat-Milk_001.jpg, 2, 1", "train/Fruit/Banana/Banana_001.jpg, 3, 2"]
VAL = ["val/Packages/Milk/Milk_001.jpg, 1, 1", "val/Fruit/Banana/Banana_001.jpg, 3, 2",
       "val/Fruit/Banana/Banana_002.jpg, 3, 2"]


def make_dataset(root: Path, classes: list[str] = CLASSES, **listings: list[str]) -> Path:
    """A Grocery Store Dataset folder: classes.csv, the listings (train.txt and val.txt
    unless given) and a small JPEG at every path they name."""
    listings = {"train": TRAIN, "val": VAL, **listings}
    root.mkdir(parents=True)
    (root / "classes.csv").write_text("\n".join([HEADER, *classes]) + "\n", encoding="utf-8")
    paths = [row.split(",")[4] for row in classes if len(row.split(",")) > 4]
    for split, lines in listings.items():
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        paths += [line.split(",")[0] for line in lines]
    for i, path in enumerate(paths):
        image = root / path.strip().replace("\\", "/").lstrip("/")
        if (image.suffix == ".jpg" and image.resolve().is_relative_to(root.resolve())
                and not image.exists()):
            image.parent.mkdir(parents=True, exist_ok=True)
            product_image(i).save(image)
    return root


def rows(path: Path) -> list[list[str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.reader(fh))[1:]


def test_paths_are_relative_to_the_csvs_so_the_project_folder_can_move(tmp_path):
    make_dataset(tmp_path / "project" / "grocery")
    written = import_grocery(tmp_path / "project" / "grocery", tmp_path / "project" / "data")
    assert sorted(written) == ["catalog", "train", "val"]
    assert rows(written["catalog"])[0] == [
        "Milk", "../grocery/iconic-images-and-descriptions/Packages/Milk/Milk/Milk_Iconic.jpg",
        "Milk", "Milk", "Packages"]
    assert rows(written["val"])[0] == ["../grocery/val/Packages/Milk/Milk_001.jpg", "Milk"]
    shutil.move(tmp_path / "project", tmp_path / "moved")
    catalog = open_catalog(tmp_path / "moved" / "data" / "catalog.csv")
    assert catalog.ids == ["Milk", "Oat-Milk", "Banana"] and catalog.get("Banana").kind == "Fruit"
    assert all(p.open().size == (160, 160) for p in catalog)
    for split, count in (("train", 4), ("val", 3)):
        photos = read_labelled_photos(tmp_path / "moved" / "data" / f"{split}.csv")
        assert len(photos) == count and all(Path(p.photo).is_file() for p in photos)


def test_a_symlinked_dataset_is_named_by_its_link_and_absolute_paths_on_request(tmp_path, capsys):
    make_dataset(tmp_path / "disk" / "grocery-store")
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "grocery").symlink_to(tmp_path / "disk" / "grocery-store")
    written = import_grocery(tmp_path / "project" / "grocery", tmp_path / "project" / "data")
    assert rows(written["train"])[0][0] == "../grocery/train/Packages/Milk/Milk_001.jpg"
    assert main(["import-grocery", str(tmp_path / "project" / "grocery"),
                 "--out", str(tmp_path / "abs"), "--absolute-paths"]) == 0
    assert rows(tmp_path / "abs" / "train.csv")[0][0] == str(
        tmp_path / "project" / "grocery" / "train" / "Packages" / "Milk" / "Milk_001.jpg")
    assert [len(read_labelled_photos(tmp_path / "abs" / f"{s}.csv")) for s in ("train", "val")] == [4, 3]


def test_a_missing_original_or_photo_is_refused_with_the_first_few_and_the_count(tmp_path):
    root = make_dataset(tmp_path / "ds")
    (root / "iconic-images-and-descriptions/Packages/Milk/Oat-Milk/Oat-Milk_Iconic.jpg").unlink()
    (root / "train/Fruit/Banana/Banana_001.jpg").unlink()
    with pytest.raises(CatalogError, match=r"2 of the 10 files named in classes\.csv and the split listings "
                       r"are not there \(classes\.csv, line 3: iconic-images-and-descriptions/Packages/Milk/"
                       r"Oat-Milk/Oat-Milk_Iconic\.jpg; train\.txt, line 4: train/Fruit/Banana/Banana_001\.jpg\)$"):
        import_grocery(root, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_folder_that_differs_in_case_is_pointed_out(tmp_path):
    root = make_dataset(tmp_path / "ds")
    (root / "val" / "Fruit").rename(root / "val" / "fruit")
    (root / "val" / "Packages").rename(root / "val" / "packages")
    with pytest.raises(CatalogError) as refused:
        import_grocery(root, tmp_path / "out")
    assert "3 of the 10 files" in str(refused.value) and "; and" not in str(refused.value)
    assert str(refused.value).endswith(
        "val.txt, line 1 names val/Packages/Milk/Milk_001.jpg, and val/packages/Milk/Milk_001.jpg is "
        "there: names are case-sensitive here; rename the file or folder, or correct the listing")
    (root / "train.txt").write_text("\n".join(TRAIN + [f"train/Fruit/Banana/Banana_00{i}.jpg, 3, 2"
                                                       for i in range(2, 6)]) + "\n")
    with pytest.raises(CatalogError, match=r"7 of the 14 files .*Banana_004\.jpg; and 4 more\)"):
        import_grocery(root, tmp_path / "out")


def test_a_class_id_given_twice_is_refused_naming_both_lines(tmp_path):
    root = make_dataset(tmp_path / "ds", [*CLASSES, klass("Pear", 2, "Pear", 3, "Fruit")])
    with pytest.raises(CatalogError, match=r"classes\.csv, lines 3 and 5: the class id 2 is given to both "
                       r"'Oat-Milk' and 'Pear'"):
        import_grocery(root, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra, why", [
    (klass("Oat Milk", 4, "Milk", 1, "Packages"), r"classes\.csv, line 5: .*invalid product id 'Oat Milk'"),
    (klass("Milk", 4, "Milk", 1, "Packages"), r"classes\.csv, lines 2 and 5: the class name 'Milk' appears twice"),
])
def test_a_class_name_that_cannot_be_a_product_id_is_refused_at_import(tmp_path, extra, why):
    root = make_dataset(tmp_path / "ds", [*CLASSES, extra])
    with pytest.raises(CatalogError, match=why):
        import_grocery(root, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bad_row, why", [
    ("foo", "1 cell"),
    ("Apple,0,Apple", "3 cell"),
    ("Apple,0,Apple,0,Apple_Iconic.jpg", "names no KIND folder"),
    (klass("Pear", "", "Pear", 3, "Fruit"), "the class id '' is not a whole number"),
    (klass("Pear", "4a", "Pear", 3, "Fruit"), "the class id '4a' is not a whole number"),
    (HEADER, r"the class id 'Class ID \(int\)' is not a whole number"),
    (klass("Pear", 4, "Pear", "", "Fruit"), "the coarse class id '' is not a whole number"),
    ("Pear,4,Pear,3,/../iconic/Fruit/Pear.jpg", r"the iconic image path .* leads outside the dataset folder"),
])
def test_only_the_first_line_of_classes_csv_may_be_a_header(tmp_path, bad_row, why):
    root = make_dataset(tmp_path / "ds", [CLASSES[0], bad_row, *CLASSES[1:]])
    with pytest.raises(CatalogError, match=r"classes\.csv, line 3: expected class name, class id, coarse "
                       rf"class name, .*{why}"):
        import_grocery(root, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # no half-written catalog.csv
    (root / "classes.csv").write_text((root / "classes.csv").read_text().replace(f"{bad_row}\n", ""))
    written = import_grocery(root, tmp_path / "out")
    assert [r[0] for r in rows(written["catalog"])] == ["Milk", "Oat-Milk", "Banana"]


def test_a_classes_csv_without_products_is_refused(tmp_path):
    root = make_dataset(tmp_path / "ds", [], train=[], val=[])
    with pytest.raises(CatalogError, match=r"classes\.csv: no products"):
        import_grocery(root, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("listing, why", [
    ("train/Packages/Milk/Milk_001.jpg,1,1\ntrain/Packages/Milk/Milk_002.jpg 1 1\n",
     r"train\.txt, line 2: expected PHOTO_PATH"),
    ("train/Packages/Milk/Milk_001.jpg,7,1\n", r"train\.txt, line 1: .*class id of classes\.csv"),
    ("train/Packages/Milk/Milk_001.jpg,1a,1\n", r"train\.txt, line 1: .*class id of classes\.csv"),
    ("../outside.jpg,1,1\n", r"train\.txt, line 1: the photo path '\.\./outside\.jpg' leads outside"),
    ("train/../../outside.jpg,1,1\n", r"train\.txt, line 1: the photo path .* leads outside"),
    (b"train/Packages/Milk/Caf\xe9_001.jpg,1,1\n", r"train\.txt: not UTF-8 text"),
])
def test_a_split_line_it_cannot_read_is_refused_and_the_earlier_csvs_kept(tmp_path, listing, why):
    """A photo line in another separator, of an unknown class, outside the dataset or not
    UTF-8: named, and the CSVs of an earlier import are left as they were."""
    root = make_dataset(tmp_path / "ds")
    product_image(9).save(tmp_path / "outside.jpg")
    first = import_grocery(root, tmp_path / "out")
    before = {name: path.read_bytes() for name, path in first.items()}
    if isinstance(listing, bytes):
        (root / "train.txt").write_bytes(listing)
    else:
        (root / "train.txt").write_text(listing, encoding="utf-8")
    with pytest.raises(CatalogError, match=why):
        import_grocery(root, tmp_path / "out")
    assert {name: path.read_bytes() for name, path in first.items()} == before


def test_a_leading_slash_or_backslashes_name_a_photo_inside_the_dataset(tmp_path):
    root = make_dataset(tmp_path / "ds", val=["/val/Packages/Milk/Milk_001.jpg, 1, 1",
                                              "val\\Fruit\\Banana\\Banana_001.jpg, 3, 2"])
    written = import_grocery(root, tmp_path / "out")
    assert rows(written["val"]) == [["../ds/val/Packages/Milk/Milk_001.jpg", "Milk"],
                                    ["../ds/val/Fruit/Banana/Banana_001.jpg", "Banana"]]
    assert all(Path(p.photo).is_file() for p in read_labelled_photos(written["val"]))


@pytest.mark.parametrize("gone", ["train.txt", "val.txt"])
def test_a_missing_train_or_val_listing_is_refused(tmp_path, gone):
    root = make_dataset(tmp_path / "ds")
    (root / gone).unlink()
    with pytest.raises(CatalogError, match=rf"ds: no {gone} \(the listing of the {gone[:-4]} photos\)"):
        import_grocery(root, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_listings_are_found_whatever_their_case(tmp_path):
    root = make_dataset(tmp_path / "ds")
    (root / "val.txt").rename(root / "VAL.TXT")
    (root / "train.txt").rename(root / "Train.txt")
    written = import_grocery(root, tmp_path / "out")
    assert [len(rows(written[s])) for s in ("train", "val")] == [4, 3]


def test_a_test_csv_of_an_earlier_import_is_removed_and_said(tmp_path, capsys):
    first = make_dataset(tmp_path / "first", test=VAL[:1])
    second = make_dataset(tmp_path / "second")
    out = tmp_path / "out"
    assert main(["import-grocery", str(first), "--out", str(out)]) == 0
    assert rows(out / "test.csv") == [["../first/val/Packages/Milk/Milk_001.jpg", "Milk"]]
    (out / "notes.csv").write_text("kept\n")
    capsys.readouterr()
    assert main(["import-grocery", str(second), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["catalog.csv", "notes.csv", "train.csv", "val.csv"]
    assert f"removed  {out / 'test.csv'}: an earlier import's; {second} has no test.txt" in capsys.readouterr().out
    (out / "test.csv").write_text("my,own\n1,2\n")  # not an import's: kept, and said
    assert main(["import-grocery", str(second), "--out", str(out)]) == 0
    assert (out / "test.csv").read_text() == "my,own\n1,2\n"
    assert f"kept     {out / 'test.csv'}: not a photo list" in capsys.readouterr().out


def test_a_csv_an_import_did_not_write_is_refused_not_replaced(tmp_path, capsys):
    """A catalogue edited by hand (a code column added) in --out: the import would replace
    it, so it refuses before writing any CSV."""
    root = make_dataset(tmp_path / "ds")
    out = tmp_path / "out"
    import_grocery(root, out)
    edited = "product_id,image,name,group,kind,code\nMilk,m.jpg,Milk,Milk,Packages,4006\n"
    (out / "catalog.csv").write_text(edited)
    train_before = (out / "train.csv").read_bytes()
    assert main(["import-grocery", str(root), "--out", str(out)]) == 2
    assert (f"{out / 'catalog.csv'}: not written by an import (another header); the import would "
            "replace it") in capsys.readouterr().err
    assert (out / "catalog.csv").read_text() == edited and (out / "train.csv").read_bytes() == train_before


@pytest.mark.parametrize("listings, why", [
    ({"val": [*VAL, TRAIN[0]]}, r"train/Packages/Milk/Milk_001\.jpg is listed in the train and the val "
                                r"split: .*\(train\.txt, line 1, and val\.txt, line 4\)"),
    ({"train": [*TRAIN, TRAIN[1]]}, r"Milk_002\.jpg is listed twice: it would count double \(train\.txt, "
                                    r"line 2, and train\.txt, line 5\)"),
    ({"train": [*TRAIN, "train/Packages/Milk/Milk_001.jpg, 2, 1"]},
     r"Milk_001\.jpg is listed as Milk and as Oat-Milk: one label is wrong"),
    ({"train": []}, r"train\.txt: lists no photo"),
])
def test_a_photo_listed_twice_or_an_empty_split_is_refused(tmp_path, listings, why):
    """A photo in two splits would be validated on what the model trained on; one under
    two products has a wrong label; an empty training split trains nothing."""
    root = make_dataset(tmp_path / "ds", **listings)
    with pytest.raises(CatalogError, match=why):
        import_grocery(root, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_out_folder_reached_through_a_symlink_gets_paths_that_resolve(tmp_path):
    root = make_dataset(tmp_path / "project" / "grocery")
    (tmp_path / "elsewhere" / "deep").mkdir(parents=True)
    (tmp_path / "project" / "data").symlink_to(tmp_path / "elsewhere" / "deep")
    written = import_grocery(root, tmp_path / "project" / "data")
    photos = read_labelled_photos(written["val"])
    assert len(photos) == 3 and all(Path(p.photo).is_file() for p in photos)


def test_the_import_says_how_many_photos_each_split_has_and_which_products_have_none(tmp_path, capsys):
    root = make_dataset(tmp_path / "ds")
    out = tmp_path / "out"
    assert main(["import-grocery", str(root), "--out", str(out)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"catalog  {out / 'catalog.csv'}  (3 products)",
        f"train    {out / 'train.csv'}  (4 photos; photos of every product)",
        f"val      {out / 'val.csv'}  (3 photos; no photo of 1 of the 3 products: Oat-Milk)",
    ]


def test_the_cli_asks_for_the_dataset_folder_and_an_output_folder(tmp_path, capsys):
    root = make_dataset(tmp_path / "ds")
    assert main(["import-grocery", str(root / "classes.csv"), "--out", str(tmp_path / "out")]) == 2
    assert (f"{root / 'classes.csv'}: this is a file; give the dataset's folder (the one holding classes.csv"
            in capsys.readouterr().err)
    (tmp_path / "afile").write_text("")
    assert main(["import-grocery", str(root), "--out", str(tmp_path / "afile")]) == 2
    assert f"{tmp_path / 'afile'} is a file; give a folder for this output" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):
        main(["import-grocery", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "catalog.csv, train.csv, val.csv and test.csv" in help_text and "--absolute-paths" in help_text


@pytest.mark.grocery
def test_grocery_dev_imports_with_paths_relative_to_the_csvs(tmp_path, grocery, capsys):
    out = tmp_path / "csv"
    assert main(["import-grocery", str(grocery), "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "(61 products)" in said and "(2060 photos; photos of every product)" in said
    assert "(211 photos; no photo of 19 of the 61 products: " in said
    relative = os.path.relpath(grocery, out)
    assert all(r[0].startswith(f"{relative}/train/") for r in rows(out / "train.csv"))
    assert len(open_catalog(out / "catalog.csv")) == 61
    assert all(Path(p.photo).is_file() for p in read_labelled_photos(out / "val.csv"))
