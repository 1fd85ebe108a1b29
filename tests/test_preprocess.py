"""One preprocessing path: enrolment (export side) and the device produce identical
encoder inputs for the same image, and JPEG draft decoding stays close to full decoding."""

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from auditlens.catalog import open_catalog
from auditlens.device_app.imaging import image_from_array, load_image
from auditlens.device_app.preprocess import (
    PreprocessSpec,
    crop_box,
    load_model_input,
    pool_views,
    stack_inputs,
    to_model_input,
    to_photo_views,
)
from auditlens.device_app.verifier import Verifier
from auditlens.errors import ImageError, ModelError
from auditlens.export.enroll import EnrollOptions, _load_original

from .conftest import MODELS, SAMPLE


def test_enrolment_and_device_inputs_are_identical(sample_bundle):
    verifier = Verifier(sample_bundle)
    product = open_catalog(SAMPLE / "catalog.csv").get("Banana")
    enrolled = _load_original(product, verifier.spec, 64).model_input
    device = verifier.prepare(product.image).views
    # the device's views are those of the image as enrolment decodes it; its plain view is
    # the enrolled original pixel for pixel (the shipped card may use a zoom for photos)
    decoded = load_image(product.image, draft=verifier.spec.draft_size)
    np.testing.assert_array_equal(device, to_photo_views(decoded, verifier.spec))
    plain = to_photo_views(decoded, replace(verifier.spec, photo_zooms=(1.0,), photo_mirror=False))
    np.testing.assert_array_equal(enrolled, plain[0])
    assert device.dtype == np.uint8 and device.shape[1:] == (verifier.spec.input_size,) * 2 + (3,)


def test_center_crop_box():
    assert crop_box((400, 300), "center") == (50, 0, 350, 300)
    assert crop_box((300, 400), "center") == (0, 50, 300, 350)
    assert crop_box((400, 300), "full") == (0, 0, 400, 300)


def test_draft_decoding_of_a_big_jpeg_stays_close(tmp_path):
    spec = PreprocessSpec(96)
    big = Image.open(SAMPLE / "photos" / "Banana_001.jpg").resize((3000, 3000), Image.Resampling.BICUBIC)
    path = tmp_path / "big.jpg"
    big.save(path, quality=92)
    fast = load_model_input(path, spec).astype(np.float32)
    full = to_model_input(load_image(path), spec).astype(np.float32)
    assert np.abs(fast - full).mean() < 3.0


def test_photo_views_are_the_plain_input_its_mirror_and_a_centred_zoom():
    spec = PreprocessSpec(64, photo_zooms=(1.0, 0.5), photo_mirror=True)
    # a 200x100 landscape photo whose centred 100x100 square has a distinct inner quarter
    image = Image.new("RGB", (200, 100), (10, 20, 30))
    image.paste((200, 40, 40), (75, 25, 125, 75))  # the centre half of the square
    image.paste((40, 200, 40), (50, 0, 60, 100))  # a stripe at the square's left edge
    views = to_photo_views(image, spec)
    assert views.shape == (4, 64, 64, 3) and views.dtype == np.uint8 and spec.num_views == 4
    np.testing.assert_array_equal(views[0], to_model_input(image, spec))
    np.testing.assert_array_equal(views[1], views[0][:, ::-1])
    np.testing.assert_array_equal(views[3], views[2][:, ::-1])
    # the 0.5 zoom sees only the red centre; the plain view sees the stripe on its left
    assert np.abs(views[2][8:-8, 8:-8].astype(int) - (200, 40, 40)).max() <= 2
    assert views[0][:, 2, 1].mean() > 150 and views[1][:, -3, 1].mean() > 150
    # a zoom alone is the one view: the same pixels as the zoom beside the plain input
    alone = to_photo_views(image, PreprocessSpec(64, photo_zooms=(0.5,)))
    assert alone.shape == (1, 64, 64, 3)
    np.testing.assert_array_equal(alone[0], views[2])


def test_shifted_views_move_the_zoom_box_left_right_up_and_down():
    """``photo_shift``: each zoom's centred box, then that box moved by the share of the
    crop box's side, left, right, up, down, each with its mirror; the boxes stay inside."""
    spec = PreprocessSpec(40, photo_zooms=(0.5,), photo_mirror=True, photo_shift=0.25)
    assert spec.num_views == 10
    # a 200x100 photo: its centred square is x 50..150; each quarter of the square has a colour
    image = Image.new("RGB", (200, 100), (0, 0, 0))
    quarters = {"left": ((50, 25, 75, 75), (220, 0, 0)), "right": ((125, 25, 150, 75), (0, 220, 0)),
                "top": ((75, 0, 125, 25), (0, 0, 220)), "bottom": ((75, 75, 125, 100), (220, 220, 0))}
    for box, colour in quarters.values():
        image.paste(colour, box)
    image.paste((255, 255, 255), (75, 25, 125, 75))  # the centre
    views = to_photo_views(image, spec)
    assert views.shape == (10, 40, 40, 3)
    for k in range(0, 10, 2):
        np.testing.assert_array_equal(views[k + 1], views[k][:, ::-1])
    centre, left, right, up, down = (views[k].astype(int) for k in range(0, 10, 2))
    inner = slice(3, -3)  # away from the box's edges, which the resize blends with what is outside

    def near(pixels, colour):
        return np.abs(pixels - colour).max() <= 3

    assert near(centre[inner, inner], (255, 255, 255))  # the middle half of the square: white
    # moved left by a quarter of the side: the box's left half is the left quarter, its right half white
    assert near(left[inner, 3:17], (220, 0, 0)) and near(left[inner, 23:-3], (255, 255, 255))
    assert near(right[inner, 23:-3], (0, 220, 0)) and near(right[inner, 3:17], (255, 255, 255))
    assert near(up[3:17, inner], (0, 0, 220)) and near(up[23:-3, inner], (255, 255, 255))
    assert near(down[23:-3, inner], (220, 220, 0)) and near(down[3:17, inner], (255, 255, 255))
    # no shift: the centred views alone, as before
    plain = to_photo_views(image, PreprocessSpec(40, photo_zooms=(0.5,), photo_mirror=True))
    np.testing.assert_array_equal(plain, views[:2])


@pytest.mark.parametrize(("name", "side", "step"), [("Arla-Standard-Milk_001.jpg", 128, 27),
                                                      ("Banana_001.jpg", 128, 27), ("Banana_001.jpg", 96, 20)])
def test_shifted_views_sliced_from_one_resize_are_each_box_resized_alone(name, side, step):
    """The five boxes of a zoom come from one resize of the region they cover; each is,
    to a grey level, its own box resized alone, moved by the whole input pixels that the
    slicing rounds the shift to: 27 of 128 (0.148 of the side), and at 96 px 20, not 21,
    which would put the moved boxes past the crop box's edge."""
    spec = PreprocessSpec(side, photo_zooms=(0.7,), photo_shift=0.15)
    image = load_image(SAMPLE / "photos" / name, draft=spec.draft_size)
    left, top, right, bottom = crop_box(image.size, spec.crop)
    width, height = right - left, bottom - top
    cx, cy = (left + right) / 2, (top + bottom) / 2
    views = to_photo_views(image, spec).astype(int)
    plain = to_photo_views(image, PreprocessSpec(side, photo_zooms=(0.7,)))
    assert np.abs(views[0] - plain[0]).max() <= 1  # the centred box: the unshifted view, to a grey level
    for view, (mx, my) in zip(views, [(0, 0), (-1, 0), (1, 0), (0, -1), (0, 1)]):
        sx, sy = mx * step * 0.7 * width / side, my * step * 0.7 * height / side
        box = (cx - 0.35 * width + sx, cy - 0.35 * height + sy, cx + 0.35 * width + sx, cy + 0.35 * height + sy)
        assert left <= box[0] and box[2] <= right
        alone = np.asarray(image.resize((side, side), Image.Resampling.BILINEAR, box=box, reducing_gap=3.0), int)
        assert np.abs(view - alone).max() <= 1


def test_a_shift_must_fit_inside_the_crop_box_and_move_a_pixel():
    # a shifted box must stay inside the crop box; a shift is a number; a manifest keeps it
    for zooms, shift in (((0.7,), 0.2), ((1.0,), 0.05), ((0.5,), -0.1), ((0.3,), 0.4)):
        with pytest.raises(ValueError, match="photo_shift"):
            PreprocessSpec(96, photo_zooms=zooms, photo_shift=shift)
    with pytest.raises(ValueError, match="photo_shift .* is not a number"):
        PreprocessSpec.from_dict({"input_size": 96, "photo_zooms": [0.7], "photo_shift": "0.15"})
    with pytest.raises(ValueError, match="encoder runs a photo, more than 20"):
        PreprocessSpec(96, photo_zooms=(0.7, 0.6, 0.5), photo_mirror=True, photo_shift=0.15)
    shifted = PreprocessSpec(96, photo_zooms=(0.7,), photo_mirror=True, photo_shift=0.15)
    assert PreprocessSpec.from_dict(shifted.to_dict()) == shifted and shifted.to_dict()["photo_shift"] == 0.15
    assert PreprocessSpec.from_dict({"input_size": 96}).photo_shift == 0.0  # older manifests: none
    with pytest.raises(ValueError, match="less than one pixel"):
        PreprocessSpec(16, photo_zooms=(0.7,), photo_shift=0.01)


def test_pooled_views_are_the_normalised_mean():
    rng = np.random.default_rng(0)
    unit = rng.normal(size=(6, 8)).astype(np.float32)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    pooled = pool_views(unit, 3)
    assert pooled.shape == (2, 8)
    expected = unit[3:].mean(0) / np.linalg.norm(unit[3:].mean(0))
    np.testing.assert_allclose(pooled[1], expected, rtol=1e-6)
    np.testing.assert_allclose(pool_views(unit, 1), unit, rtol=1e-6)


def test_specs_written_before_photo_views_keep_one_view():
    old = PreprocessSpec.from_dict({"input_size": 96, "crop": "center"})
    assert old.photo_zooms == (1.0,) and not old.photo_mirror and old.num_views == 1
    new = PreprocessSpec(96)
    assert PreprocessSpec.from_dict(new.to_dict()) == new and new.num_views == 1
    zoomed = PreprocessSpec(96, photo_zooms=(1.0, 0.85))
    assert PreprocessSpec.from_dict(zoomed.to_dict()) == zoomed and zoomed.num_views == 2
    tight = PreprocessSpec(96, photo_zooms=(0.7,))
    assert PreprocessSpec.from_dict(tight.to_dict()) == tight and tight.num_views == 1
    for zooms in ((1.0, 0.1), (0.2,), (1.5,), ()):
        with pytest.raises(ValueError):
            PreprocessSpec(96, photo_zooms=zooms)


def test_verifier_pools_the_views_of_a_capture(tmp_path):
    from auditlens.export.enroll import enroll

    model = tmp_path / "encoder.tflite"
    shutil.copy(MODELS / "encoder.tflite", model)
    card = json.loads((MODELS / "encoder.json").read_text())
    card["preprocess"] = PreprocessSpec(card["preprocess"]["input_size"], photo_zooms=(1.0, 0.85)).to_dict()
    (tmp_path / "encoder.json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match="second look"):  # the card's second look cannot move a 1.0 view
        enroll(open_catalog(SAMPLE / "catalog.csv"), tmp_path / "bundle", model=model,
               options=EnrollOptions(progress=False))
    del card["decision"]["second_look"], card["decision"]["rivals"]["alone"]["second_look"]
    (tmp_path / "encoder.json").write_text(json.dumps(card))
    bundle = enroll(open_catalog(SAMPLE / "catalog.csv"), tmp_path / "bundle", model=model,
                    options=EnrollOptions(progress=False))
    verifier = Verifier(bundle)
    assert verifier.spec.num_views == 2  # the plain input and the 0.85 zoom
    capture = verifier.prepare(SAMPLE / "photos" / "Banana_001.jpg")
    assert capture.views.shape[0] == 2
    one_by_one = verifier.encoder.embed(capture.views, batch_size=1)
    np.testing.assert_allclose(verifier.embed(capture), pool_views(one_by_one, 2)[0], atol=1e-6)
    # pooling is what decides: the pooled latent differs from the plain view's
    assert float(verifier.embed(capture) @ one_by_one[0]) < 0.9999


def test_stack_inputs_is_the_per_image_path_in_bulk(tmp_path):
    spec = PreprocessSpec(48)
    paths = sorted((SAMPLE / "photos").glob("*.jpg"))[:3]
    plain = stack_inputs(paths, spec)
    assert plain.shape == (3, 48, 48, 3) and plain.dtype == np.uint8
    # decoded as the device decodes (reduced JPEG decoding), so training sees its pixels
    np.testing.assert_array_equal(plain[2], load_model_input(paths[2], spec))
    assert Image.open(paths[2]).width >= 4 * spec.input_size  # the draft path is exercised
    big = stack_inputs(paths[:1], spec, size=64)
    np.testing.assert_array_equal(big[0], to_model_input(load_image(paths[0], draft=(128, 128)), spec, 64))
    views = stack_inputs(paths, spec, views=True)
    assert views.shape == (3 * spec.num_views, 48, 48, 3)
    np.testing.assert_array_equal(views[spec.num_views:2 * spec.num_views],
                                  to_photo_views(load_image(paths[1], draft=spec.draft_size), spec))
    assert stack_inputs([], spec).shape == (0, 48, 48, 3)
    broken = tmp_path / "cut.jpg"
    broken.write_bytes(paths[0].read_bytes()[:300])
    with pytest.raises(ImageError, match="cut.jpg"):
        stack_inputs([paths[0], broken], spec)


GREY = 128


@pytest.mark.parametrize("array", [
    np.full((40, 48), GREY, np.uint8),
    np.full((40, 48, 1), GREY, np.uint8),
    np.full((40, 48, 3), GREY, np.uint8),
    np.full((40, 48), GREY, np.int64),  # np.array of Python ints
    np.full((40, 48, 3), GREY * 257, np.uint16),  # 16-bit, as a 16-bit PNG
    np.full((40, 48), GREY / 255, np.float32),  # 0..1 floats
    np.full((40, 48, 3), GREY / 255, np.float64),
    np.full((40, 48, 1), float(GREY), np.float32),  # 0..255 floats
    np.full((40, 48, 4), [GREY, GREY, GREY, 255], np.uint8),  # opaque RGBA
    np.asfortranarray(np.full((40, 48, 3), GREY, np.uint8)),
], ids=["grey", "grey1", "rgb", "int64", "uint16", "float01", "rgb-float01", "float255",
        "rgba", "fortran"])
def test_arrays_of_every_accepted_shape_and_dtype(array):
    image = load_image(array)
    assert image.mode == "RGB" and image.size == (48, 40)
    assert (np.asarray(image) == GREY).all()


def test_rgba_array_is_composited_on_white_and_float_nan_is_black():
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:, 16:, 3] = 255  # left half transparent
    a = np.asarray(load_image(rgba))
    assert (a[:, :16] == 255).all() and (a[:, 16:] == [255, 0, 0]).all()
    values = np.full((32, 32, 3), 0.5)
    values[0, 0] = np.nan
    a = np.asarray(load_image(values))
    assert a[0, 0].tolist() == [0, 0, 0] and (a[1:] == 128).all()


@pytest.mark.parametrize("array", [
    np.zeros((40, 48, 2), np.uint8),
    np.zeros((40, 48, 3, 1), np.uint8),
    np.zeros(48, np.uint8),
    np.zeros((40, 48), bool),
    np.zeros((40, 48), complex),
    np.full((40, 48), "x", object),
], ids=["2-channels", "4-d", "1-d", "bool", "complex", "object"])
def test_unusable_arrays_raise_image_error_naming_what_is_accepted(array):
    with pytest.raises(ImageError, match=r"\(H, W\) or \(H, W, 1\) grey, \(H, W, 3\) RGB") as info:
        load_image(array)
    assert str(array.shape) in str(info.value) and str(array.dtype) in str(info.value)
    with pytest.raises(ImageError):
        image_from_array(array)


def test_small_arrays_are_refused_like_small_files():
    from auditlens.cli import default_bundle
    from auditlens.errors import ImageTooSmallError

    with pytest.raises(ImageTooSmallError, match="8x8 pixels"):
        load_image(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ImageTooSmallError):
        load_image(np.zeros((0, 0), np.float32))
    # through the verifier, which turns the array into an image first: named as pixels
    # handed over, not as a stream
    with pytest.raises(ImageTooSmallError, match=r"^<image handed over as pixels>: 0x0 pixels"):
        Verifier(default_bundle()).prepare(np.zeros((0, 0, 3), np.uint8))


def test_verifier_prepares_arrays_as_it_prepares_files(sample_photos):
    from auditlens.cli import default_bundle

    verifier = Verifier(default_bundle())
    photo = sample_photos[0]
    rgb = np.asarray(load_image(photo.photo))
    from_file = verifier.embed(verifier.prepare(photo.photo))
    for array in (rgb, rgb.astype(np.float32) / 255.0, np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])):
        assert float(verifier.embed(verifier.prepare(array)) @ from_file) > 0.999
    grey = verifier.prepare(rgb.mean(axis=2).astype(np.uint8)[..., None])
    assert grey.image.mode == "RGB"
    with pytest.raises(ImageError):
        verifier.prepare(rgb[..., :2])


def test_stack_inputs_names_every_image_it_cannot_use(tmp_path):
    """train read a catalogue's originals through here and reported the first bad one only
    (enroll lists them all): one is raised as it is, several in one error with the count."""
    from auditlens.errors import ImageError, TruncatedImageError, UnreadableImageError

    spec = PreprocessSpec(48)
    good = sorted((SAMPLE / "photos").glob("*.jpg"))[:2]
    (tmp_path / "text.jpg").write_text("not an image")
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(good[0].read_bytes()[:4000])
    with pytest.raises(UnreadableImageError, match="text.jpg"):
        stack_inputs([good[0], tmp_path / "text.jpg", good[1]], spec)
    bad = [tmp_path / "text.jpg", cut] + [tmp_path / f"missing{i}.jpg" for i in range(5)]
    with pytest.raises(ImageError, match=r"^7 images cannot be used: .*text.jpg.*; .*cut.jpg.*; and 2 more$") as info:
        stack_inputs([good[0], *bad], spec)
    assert not isinstance(info.value, (UnreadableImageError, TruncatedImageError))
