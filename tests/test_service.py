"""auditlens inside a service: the library's promises to a caller that is not the CLI.

A verification service loads a bundle once, shares a Verifier between requests, takes
photos in whatever form its web framework hands over, and must be able to tell a bad
upload (an :class:`~auditlens.errors.AuditlensError`) from its own mistakes.
"""

from __future__ import annotations

import io
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from auditlens import ReferenceBundle, Verifier, enroll, open_catalog
from auditlens.device_app.verifier import VerifierOptions
from auditlens.errors import BundleSignatureError, ModelMismatchError, UnreadableImageError
from tests.conftest import SAMPLE, needs_signing


@pytest.fixture(scope="module")
def verifier(sample_bundle) -> Verifier:
    return Verifier(sample_bundle)


@pytest.fixture(scope="module")
def big_photo(sample_photos) -> tuple[bytes, str]:
    """A sample photo as a phone would send it: 12 MP, JPEG, with sensor noise."""
    photo = sample_photos[0]
    image = Image.open(photo.photo).convert("RGB").resize((4032, 3024), Image.Resampling.BICUBIC)
    noisy = np.asarray(image, np.int16) + np.random.default_rng(0).normal(0, 4, (3024, 4032, 3)).astype(np.int16)
    out = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=92)
    return out.getvalue(), photo.product_id


@needs_signing
def test_a_preloaded_bundle_is_held_to_the_publisher_key(tmp_path, shipped_model):
    """A service loads the bundle once and hands the object over: the key it passes must
    still refuse a bundle that was not checked against it."""
    from auditlens.device_app.signing import generate_keypair

    private, public = generate_keypair(tmp_path / "keys")
    _, stranger = generate_keypair(tmp_path / "stranger")
    catalog = open_catalog(SAMPLE / "catalog.csv")
    signed = enroll(catalog, tmp_path / "signed", model=shipped_model, signing_key=private.read_bytes())
    unsigned = enroll(catalog, tmp_path / "unsigned", model=shipped_model)

    with pytest.raises(BundleSignatureError, match="without checking its signature"):
        Verifier(ReferenceBundle.load(unsigned), public_key=public.read_bytes())
    with pytest.raises(BundleSignatureError, match="without checking its signature"):
        Verifier(ReferenceBundle.load(signed), public_key=public.read_bytes())
    checked_by_stranger = ReferenceBundle.load  # a bundle checked against another key
    with pytest.raises(BundleSignatureError):
        checked_by_stranger(signed, public_key=stranger.read_bytes())
    with pytest.raises(BundleSignatureError, match="checked against key"):
        Verifier(ReferenceBundle.load(signed, public_key=public.read_bytes()),
                 public_key=stranger.read_bytes())
    accepted = Verifier(ReferenceBundle.load(signed, public_key=public.read_bytes()),
                        public_key=public.read_bytes())
    assert accepted.bundle.signed_by and len(accepted.bundle.products) == 10
    # the key file's name, as the command line takes it: as text it is read as the key,
    # so the refusal says to pass a path; a Path is read
    with pytest.raises(BundleSignatureError, match=r"names a file: pass it as a path, pathlib.Path"):
        Verifier(signed, public_key=str(public))
    assert Verifier(signed, public_key=public).bundle.signed_by == accepted.bundle.signed_by


def test_one_photo_scores_alike_from_a_file_bytes_a_stream_a_pil_image_and_an_array(verifier, big_photo, tmp_path):
    data, product_id = big_photo
    path = tmp_path / "photo.jpg"
    path.write_bytes(data)
    scores = {
        "path": verifier.verify(path, product_id).score,
        "bytes": verifier.verify(data, product_id).score,
        "memoryview": verifier.verify(memoryview(data), product_id).score,
        "stream": verifier.verify(io.BytesIO(data), product_id).score,
    }
    assert len(set(scores.values())) == 1, scores
    # decoded pixels (a PIL image, an array) and a PNG come to the same scale by box
    # averaging, close to the JPEG decoder's own reduction but not bit for bit
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    png = io.BytesIO()
    Image.fromarray(decoded).save(png, "PNG", compress_level=1)
    for other in (Image.open(io.BytesIO(data)), decoded, png.getvalue()):
        assert abs(verifier.verify(other, product_id).score - scores["bytes"]) < 0.05


def test_a_verdict_on_decoded_pixels_is_logged_with_a_lossless_copy_of_them(verifier, big_photo, tmp_path):
    """The verdict's photo_sha256 is of the pixels as handed over, not of the reduced copy
    the encoder saw: the audit log takes their PNG as the judged photo."""
    from auditlens.device_app.auditlog import AuditLog

    data, product_id = big_photo
    frame = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))[:1200, :1600]  # a camera frame
    verdict = verifier.verify(frame, product_id)
    png = io.BytesIO()
    Image.fromarray(frame).save(png, "PNG", compress_level=1)
    with AuditLog(tmp_path / "audit.db") as log:
        log.append(verdict, photo=png.getvalue(), auditor="A")
        assert log.verify_chain().records == 1


def test_decoded_images_reach_the_encoder_at_the_scale_of_a_drafted_jpeg(verifier, big_photo):
    from auditlens.device_app.imaging import draft_scale, load_image, reduce_like_draft

    data, _ = big_photo
    draft = verifier.spec.draft_size
    from_jpeg = load_image(data, draft=draft)
    decoded = Image.open(io.BytesIO(data)).convert("RGB")
    decoded.load()
    assert from_jpeg.size == load_image(decoded, draft=draft).size == load_image(np.asarray(decoded), draft=draft).size
    assert reduce_like_draft(decoded, draft).size == from_jpeg.size
    assert draft_scale(decoded.size, draft) == 8 and from_jpeg.size == (504, 378)
    assert load_image(decoded).size == (4032, 3024)  # no draft asked: full size
    assert draft_scale((511, 700), (256, 256)) == 1 and draft_scale((512, 700), (256, 256)) == 2


def test_a_capture_made_for_one_bundle_is_embedded_again_by_another(tmp_path, verifier, sample_photos,
                                                                   shipped_model):
    """Two bundles in one service (or a bundle replaced while it runs): a capture keeps the
    model and the views it was embedded with, and another model does not score its latent."""
    other_model = bytearray(shipped_model.read_bytes())
    other_model[len(other_model) // 3] ^= 0x10  # same graph, one weight changed: another model
    (tmp_path / "other.tflite").write_bytes(bytes(other_model))
    other = Verifier(enroll(open_catalog(SAMPLE / "catalog.csv"), tmp_path / "b", model=tmp_path / "other.tflite"))
    assert other.bundle.model_id != verifier.bundle.model_id and other.spec != verifier.spec

    photo = sample_photos[3]
    capture = verifier.prepare(photo.photo)
    first = verifier.embed(capture).copy()
    assert other.embed(capture) is capture.latent and capture.model_id == other.bundle.model_id
    own = other.embed(other.prepare(photo.photo))
    np.testing.assert_array_equal(capture.latent, own)
    assert not np.allclose(first, own, atol=1e-3)
    assert other.verify(capture, photo.product_id).score == other.verify(photo.photo, photo.product_id).score

    released = verifier.prepare(photo.photo)
    verifier.embed(released)
    released.release_pixels()
    with pytest.raises(ModelMismatchError, match="prepare the photo again"):
        other.verify(released, photo.product_id)


@pytest.mark.parametrize("setting, value, why", [
    ("threshold", "0.6", "finite score"),
    ("threshold", float("nan"), "finite score"),
    ("threshold", float("inf"), "finite score"),
    ("threshold", True, "finite score"),
    ("num_threads", 0, "num_threads must be a whole number 1 to 256"),
    ("num_threads", 10**6, "num_threads must be a whole number 1 to 256"),  # LiteRT would start them all
    ("num_threads", 2.0, "num_threads must be a whole number"),
    ("suggestions", -1, "suggestions must be a whole number at least 0"),
    ("near_duplicate_bits", 65, "near_duplicate_bits must be a whole number 0 to 64"),
    ("max_pixels", 0, "max_pixels"),
    ("max_file_bytes", "100", "max_file_bytes"),
    ("check_quality", "no", "check_quality must be True or False, not 'no'"),
    ("check_quality", 0, "check_quality must be True or False"),
    ("quality", None, "quality must be QualityThresholds, not None"),
])
def test_verifier_options_that_cannot_work_are_refused_when_made(setting, value, why):
    with pytest.raises(ValueError, match=why):
        VerifierOptions(**{setting: value})


def test_a_threshold_outside_the_bundles_scores_is_refused(sample_bundle, tmp_path):
    from auditlens.evaluation.calibrate import rewrite_bundle

    weighted = ReferenceBundle.load(sample_bundle)  # cosine + 0.107 x cells z: within -11.7..11.7
    assert Verifier(weighted, VerifierOptions(threshold=1.5)).threshold == 1.5
    with pytest.raises(ValueError, match=r"outside the scores this bundle gives \(-11.\d+\.\.11.\d+\)"):
        Verifier(weighted, VerifierOptions(threshold=50))
    cosine = ReferenceBundle.load(rewrite_bundle(weighted, tmp_path / "cosine", {"threshold": 0.6}))
    with pytest.raises(ValueError, match="outside the scores this bundle gives .a cosine within -1..1"):
        Verifier(cosine, VerifierOptions(threshold=1.5))


@pytest.mark.parametrize("limit, value", [("min_brightness", "40"), ("min_colour", float("nan")),
                                          ("max_clipped", 1.5), ("min_sharpness", -1), ("min_frame_detail", True)])
def test_quality_limits_that_would_fail_or_switch_a_check_off_are_refused_when_made(limit, value):
    """Text read from a service's settings failed every verify; NaN turned the colour
    check off unnoticed (it compares false with everything)."""
    from auditlens.device_app.quality import QualityThresholds

    with pytest.raises(ValueError, match=f"QualityThresholds.{limit} must be a number"):
        QualityThresholds(**{limit: value})
    assert QualityThresholds(min_brightness=np.float32(30)).min_brightness == 30.0


def test_the_size_limits_hold_for_every_form_of_a_photo(sample_bundle, sample_photos):
    """max_file_bytes holds for bytes handed over as for a file or a stream, and max_pixels
    refuses a pixel array before converting it (a float array takes several times its
    own memory to convert); an empty stream says it may not have been rewound."""
    import io

    from auditlens.errors import ImageTooLargeError, UnreadableImageError

    data = Path(sample_photos[0].photo).read_bytes()
    small = Verifier(sample_bundle, VerifierOptions(max_file_bytes=1000, max_pixels=100_000))
    for form in (data, io.BytesIO(data), sample_photos[0].photo):
        with pytest.raises(ImageTooLargeError, match="1,000"):
            small.prepare(form)
    big = np.zeros((1000, 1000, 3), np.float32)
    with pytest.raises(ImageTooLargeError, match="the pixel array: 1000x1000 pixels is more than the 100,000"):
        small.prepare(big)
    stream = io.BytesIO(data)
    stream.read()
    with pytest.raises(UnreadableImageError, match=r"gave no bytes.*seek\(0\) rewinds it"):
        Verifier(sample_bundle).prepare(stream)


def test_the_command_line_takes_the_engines_thread_limit():
    from auditlens import cli
    from auditlens.device_app import verifier

    assert cli.MAX_THREADS == verifier.MAX_THREADS


def test_verifier_options_take_a_threshold_in_any_number_type(sample_bundle):
    options = VerifierOptions(threshold=np.float32(0.25), num_threads=np.int64(2))
    assert type(options.threshold) is float and Verifier(sample_bundle, options).threshold == 0.25


def test_a_photo_in_a_form_auditlens_cannot_read_is_an_image_error(verifier, tmp_path, sample_photos):
    photo = Path(sample_photos[0].photo)
    closed = open(photo, "rb")
    closed.close()
    with open(photo, encoding="latin-1") as text_mode:
        for bad, why in ((text_mode, "binary mode"), (closed, "cannot read the photo stream"),
                         ([1, 2, 3], "cannot read a photo from list"), (None, "from NoneType"),
                         (42, "from int"), (str(photo) + "\0.jpg", "cannot read the file")):
            with pytest.raises(UnreadableImageError, match=why):
                verifier.verify(bad, sample_photos[0].product_id)
            with pytest.raises(UnreadableImageError, match=why):
                verifier.identify(bad)


def test_the_library_leaves_the_processs_stderr_alone(monkeypatch, shipped_model, capfd):
    """Swapping file descriptor 2 would lose a service's other output for a moment; only
    the CLI, whose process is its own, filters the runtime's notice."""
    from auditlens.device_app import interpreter

    swaps = []
    real_dup2 = os.dup2
    monkeypatch.setattr(interpreter.os, "dup2", lambda a, b: swaps.append(b) or real_dup2(a, b))
    interpreter.drop_runtime_notice(False)
    interpreter.Encoder(shipped_model)
    assert swaps == []
    interpreter.drop_runtime_notice(True)
    try:
        interpreter.Encoder(shipped_model)
        assert swaps == [2, 2]  # pointed away and back
    finally:
        interpreter.drop_runtime_notice(False)


def test_enrolling_with_a_model_that_cannot_be_read_is_a_model_error(tmp_path):
    from auditlens.errors import ModelError

    catalog = open_catalog(SAMPLE / "catalog.csv")
    for model, why in ((tmp_path / "missing.tflite", "No such file"), (tmp_path, "Is a directory")):
        with pytest.raises(ModelError, match=f"cannot read the model file: {why}"):
            enroll(catalog, tmp_path / "b", model=model)
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("top_k", [0, -1, None, "3", 2.5, True])
def test_a_top_k_that_is_not_a_whole_number_of_at_least_one_is_a_value_error(verifier, sample_photos, top_k):
    """`identify(top_k=None)` raised a TypeError from deep inside, not the ValueError the
    README promises for a wrong argument."""
    capture = verifier.prepare(sample_photos[0].photo)
    with pytest.raises(ValueError, match="top_k must be a whole number of at least 1"):
        verifier.identify(capture, top_k=top_k)
    assert len(verifier.identify(capture, top_k=np.int64(2))) == 2


def test_a_capture_without_its_pixels_is_judged_by_its_first_look_and_says_so(verifier, sample_photos):
    """Near the threshold the second look needs the pixels: keep_image=False judges by the
    first look (as documented); the embed, look, release order keeps the look."""
    verifier = Verifier(verifier.bundle)
    verifier.second_look = replace(verifier.second_look, band=2.0)  # every first score is near
    photo = next(p for p in sample_photos if verifier.takes_second_look(
        verifier.score(verifier.embed(c := verifier.prepare(p.photo)), p.product_id, c.cells)))
    whole = verifier.verify(photo.photo, photo.product_id)
    bare = verifier.verify(verifier.prepare(photo.photo, keep_image=False), photo.product_id)
    assert whole.first_score is not None and bare.first_score is None
    assert "no second look, the capture's pixels were released" in bare.reasons[0]
    capture = verifier.prepare(photo.photo)
    verifier.embed_second_look(capture)
    capture.release_pixels()
    kept = verifier.verify(capture, photo.product_id)
    assert (kept.score, kept.decision, kept.first_score) == (whole.score, whole.decision, whole.first_score)
