import io

import numpy as np
import pytest
from PIL import Image

from auditlens.device_app.nearcopy import dhash, hamming
from auditlens.device_app.verifier import (
    MATCH,
    NO_MATCH,
    RETAKE,
    Verifier,
    VerifierOptions,
)
from auditlens.errors import UnknownProductError

from .conftest import SAMPLE


@pytest.fixture(scope="module")
def verifier(sample_bundle):
    return Verifier(sample_bundle)


def test_one_verifier_shared_by_threads_gives_the_sequential_scores(verifier, sample_photos):
    """A service may call one Verifier from several threads: each call must run its own
    interpreter pass (without the encoder's lock LiteRT raised 'at least 1 reference to
    internal data in the interpreter')."""
    from concurrent.futures import ThreadPoolExecutor

    jobs = [(p.photo, p.product_id) for p in sample_photos[:8]] * 4
    expected = {job: verifier.verify(*job).score for job in set(jobs)}
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda job: (job, verifier.verify(*job).score), jobs))
    assert all(score == expected[job] for job, score in got)


def test_genuine_photos_outscore_impostors(verifier, sample_photos):
    """On the shipped sample, each photo scores higher against its own product than the
    average other product does (a property of a working encoder, not of one photo)."""
    wins = 0
    for photo in sample_photos:
        capture = verifier.prepare(photo.photo)
        scores = verifier.product_scores(verifier.embed(capture), capture.cells)
        own = scores[verifier.bundle.index(photo.product_id)]
        wins += own > np.median(scores)
    assert wins >= 0.75 * len(sample_photos)


def test_rank_scores_are_the_scores_verify_gives(verifier, sample_photos):
    """identify's candidates carry the score a verify of that product would log."""
    capture = verifier.prepare(sample_photos[0].photo)
    latent = verifier.embed(capture)
    ranked = verifier.rank(latent, len(verifier.bundle.products), capture.cells)
    assert [c.score for c in ranked] == sorted((c.score for c in ranked), reverse=True)
    for c in ranked:
        assert c.score == pytest.approx(verifier.score(latent, c.product_id, capture.cells), abs=1e-6)
        verdict = verifier.verify(capture, c.product_id)
        first = verdict.score if verdict.first_score is None else verdict.first_score
        assert c.score == pytest.approx(first, abs=1e-6)


def test_verdict_carries_what_an_audit_record_needs(verifier, sample_photos):
    photo = sample_photos[0]
    v = verifier.verify(photo.photo, photo.product_id)
    assert v.decision in (MATCH, NO_MATCH)
    assert (v.decision == MATCH) == (v.score >= v.threshold)
    assert v.model_id == verifier.bundle.model_id and len(v.photo_sha256) == 64
    assert v.to_dict()["quality"]["issues"] == []


def test_a_copy_of_the_original_is_flagged(verifier):
    original = SAMPLE / "originals" / "Banana.jpg"
    v = verifier.verify(original, "Banana")
    assert v.decision == RETAKE and v.near_duplicate
    # re-encoded and resized copies are caught too
    buf = io.BytesIO()
    Image.open(original).resize((500, 500)).save(buf, "JPEG", quality=70)
    assert verifier.verify(buf.getvalue(), "Banana").near_duplicate


def test_dark_capture_asks_for_a_retake(verifier, sample_photos):
    img = Image.open(sample_photos[0].photo).point(lambda v: v // 12)
    v = verifier.verify(img, sample_photos[0].product_id)
    assert v.decision == RETAKE and any("dark" in r for r in v.reasons)
    relaxed = Verifier(verifier.bundle, VerifierOptions(check_quality=False))
    assert relaxed.verify(img, sample_photos[0].product_id).decision in (MATCH, NO_MATCH)


def test_no_match_lists_lookalikes_and_never_the_claimed_product(verifier, sample_photos):
    strict = Verifier(verifier.bundle, VerifierOptions(threshold=5.0))  # above every score
    v = strict.verify(sample_photos[0].photo, "Carrots")
    assert v.decision == NO_MATCH
    assert len(v.suggestions) == 3 and "Carrots" not in [c.product_id for c in v.suggestions]
    assert [c.score for c in v.suggestions] == sorted((c.score for c in v.suggestions), reverse=True)
    # a milk photo claimed as carrots looks more like a milk; claimed as itself, the
    # suggestions are only its nearest other products, and the verdict says so
    assert v.outscored and v.suggestions[0].score > v.score
    own = strict.verify(sample_photos[0].photo, sample_photos[0].product_id)
    assert own.decision == NO_MATCH and own.score > own.suggestions[0].score and not own.outscored


def test_unknown_product_id(verifier, sample_photos):
    with pytest.raises(UnknownProductError, match="not in this bundle"):
        verifier.verify(sample_photos[0].photo, "does-not-exist")


def test_identify_ranks_all_products(verifier, sample_photos):
    ranked = verifier.identify(sample_photos[0].photo, top_k=20)
    assert len(ranked) == 10  # top_k beyond the catalogue: every product, once
    assert {c.product_id for c in ranked} == {p.product_id for p in verifier.bundle.products}
    scores = [c.score for c in ranked]
    assert scores == sorted(scores, reverse=True)
    capture = verifier.prepare(sample_photos[0].photo)
    latent = verifier.embed(capture)
    for c in ranked:  # each score is the photo's score against that product
        assert c.score == pytest.approx(verifier.score(latent, c.product_id, capture.cells), abs=1e-6)


def test_capture_checks_read_the_luminance_as_the_colour_image_would(verifier, sample_photos):
    """prepare() makes one small grey copy for the quality check and the dHash: the quality
    comes out exactly as from the colour image, and the dHash within a bit of the whole
    image's (enrolled originals' hashes are of the whole image; a near copy is 5 bits)."""
    from auditlens.device_app.imaging import load_image
    from auditlens.device_app.quality import analysis_copy, assess

    bits = []
    for photo in sample_photos:
        image = load_image(photo.photo, draft=verifier.spec.draft_size)
        capture = verifier.prepare(photo.photo)
        assert capture.quality == assess(image)
        assert capture.dhash == dhash(analysis_copy(image))
        bits.append(hamming(capture.dhash, dhash(image)))
    assert max(bits) <= 1 and bits.count(0) >= len(bits) // 2, bits


def test_a_dark_or_washed_out_photo_is_sent_back_for_its_light_alone():
    """Detail cannot be measured in a frame that is too dark or overexposed: the auditor is
    told to fix the light, not also to hold still and reframe."""
    from PIL import ImageEnhance

    from auditlens.device_app.quality import assess

    photo = Image.open(SAMPLE / "photos" / "Banana_001.jpg").convert("RGB")
    for factor, only in ((0.08, "too dark"), (6.0, "overexposed or glare")):
        quality = assess(ImageEnhance.Brightness(photo).enhance(factor))
        assert [i.split(":")[0] for i in quality.issues] == [only], quality.issues
    dark_and_flat = Image.new("RGB", (400, 300), (8, 8, 8))
    assert [i.split(":")[0] for i in assess(dark_and_flat).issues] == ["too dark"]
    for colour in ((128, 128, 128), (255, 255, 255)):  # lit, but nothing in it (white: a
        flat = Image.new("RGB", (400, 300), colour)  # fully transparent PNG, as it loads)
        assert [i.split(":")[0] for i in assess(flat).issues] == ["blank"]


def test_a_partly_transparent_image_is_sent_back_as_such_not_as_glare(verifier, tmp_path):
    """A PNG half see-through loads with that half white: the reason names the transparency,
    while the same pixels with no alpha (a white half in the photo) read as glare."""
    photo = np.asarray(Image.open(SAMPLE / "photos" / "Banana_001.jpg").convert("RGBA")).copy()
    photo[:, : photo.shape[1] // 2, 3] = 0
    Image.fromarray(photo).save(tmp_path / "cut.png")
    verdict = verifier.verify(tmp_path / "cut.png", "Banana")
    assert verdict.decision == "retake"
    assert [r.split(":")[0] for r in verdict.reasons] == ["partly transparent"]
    assert "50% of the image is see-through" in verdict.reasons[0]
    whitened = photo[..., :3].copy()
    whitened[:, : photo.shape[1] // 2] = 255
    Image.fromarray(whitened).save(tmp_path / "white.png")
    assert verifier.verify(tmp_path / "white.png", "Banana").reasons[0].startswith("overexposed or glare")
    # the count is the loader's own: a PNG text chunk of that name is not taken for it
    from PIL import PngImagePlugin

    from auditlens.device_app.imaging import TRANSPARENT_SHARE

    chunk = PngImagePlugin.PngInfo()
    chunk.add_text(TRANSPARENT_SHARE, "0.9")
    Image.fromarray(whitened).save(tmp_path / "labelled.png", pnginfo=chunk)
    assert Image.open(tmp_path / "labelled.png").info[TRANSPARENT_SHARE] == "0.9"
    labelled = verifier.verify(tmp_path / "labelled.png", "Banana")
    assert [r.split(":")[0] for r in labelled.reasons] == ["overexposed or glare"]
    # and a see-through half beside an overexposed one: both are said
    from PIL import ImageEnhance

    bright = np.asarray(ImageEnhance.Brightness(Image.fromarray(photo[..., :3])).enhance(10.0)).copy()
    Image.fromarray(np.dstack([bright, photo[..., 3]])).save(tmp_path / "cut_bright.png")
    both = verifier.verify(tmp_path / "cut_bright.png", "Banana")
    assert [r.split(":")[0] for r in both.reasons] == ["partly transparent", "overexposed or glare"]


def test_a_greyscale_photo_is_sent_back_for_its_colour(sample_photos):
    """A greyscale capture (a mono filter, a converted file) lost what tells products apart:
    on the shipped model it was judged, a genuine photo as NO MATCH and another milk's photo
    as a MATCH (found in review), so it is a RETAKE, whatever the mode it comes in."""
    import io

    from auditlens.device_app.imaging import load_image
    from auditlens.device_app.quality import QualityThresholds, assess

    limit = QualityThresholds().min_colour
    for photo in sample_photos:
        colour = load_image(photo.photo)
        assert assess(colour).colour > 5 * limit and not any(
            i.startswith("no colour") for i in assess(colour).issues), photo.product_id
        for mode, fmt in (("L", "JPEG"), ("LA", "PNG")):
            data = io.BytesIO()
            colour.convert(mode).save(data, fmt)
            grey = assess(load_image(data.getvalue()))
            assert grey.colour < limit and [i.split(":")[0] for i in grey.issues] == ["no colour"]


def test_dhash_is_stable_under_resizing():
    img = Image.open(SAMPLE / "originals" / "Carrots.jpg")
    assert hamming(dhash(img), dhash(img.resize((64, 64)))) <= 3
    assert hamming(dhash(img), dhash(Image.open(SAMPLE / "originals" / "Banana.jpg"))) > 10


def test_the_runtime_notice_is_dropped_and_other_stderr_output_kept(capfd):
    import os

    from auditlens.device_app.interpreter import Encoder, without_delegate_notice

    Encoder(SAMPLE.parent / "encoder.tflite")
    capfd.readouterr()  # a library Encoder leaves the notice alone; the CLI turns the filter on
    with without_delegate_notice():
        os.write(2, b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n")
        os.write(2, b"a warning written meanwhile\n")
    assert capfd.readouterr().err == "a warning written meanwhile\n"


def test_a_photo_stream_longer_than_the_limit_is_refused_without_reading_it_all(sample_bundle):
    from auditlens.device_app.verifier import VerifierOptions
    from auditlens.errors import ImageTooLargeError

    class Endless(io.RawIOBase):  # a stream that never ends (a pipe, a socket)
        served = 0

        def readable(self):
            return True

        def readinto(self, buffer):
            buffer[:] = b"\xff" * len(buffer)
            self.served += len(buffer)
            return len(buffer)

    small = Verifier(sample_bundle, VerifierOptions(max_file_bytes=100_000))
    stream = Endless()
    with pytest.raises(ImageTooLargeError, match="more than the 100,000 bytes"):
        small.prepare(io.BufferedReader(stream))
    assert stream.served < 200_000
    photo = (SAMPLE / "photos" / "Banana_001.jpg").read_bytes()
    assert len(photo) < 100_000
    assert small.verify(io.BytesIO(photo), "Banana").decision == "match"


def test_best_reference_scores_is_the_best_of_each_products_references():
    from auditlens.device_app.search import best_reference_scores

    rng = np.random.default_rng(0)
    references = rng.standard_normal((7, 4)).astype(np.float32)
    references /= np.linalg.norm(references, axis=1, keepdims=True)  # unit rows, as bundles hold
    owner = np.array([0, 1, 1, 2, 3, 3, 3])  # product 4 has no reference
    latents = rng.standard_normal((5, 4)).astype(np.float32)
    latents /= np.linalg.norm(latents, axis=1, keepdims=True)
    sims = latents @ references.T
    got = best_reference_scores(latents, references, owner, 5)
    for p in range(4):
        np.testing.assert_allclose(got[:, p], sims[:, owner == p].max(axis=1), rtol=1e-6)
    assert np.isneginf(got[:, 4]).all()
    np.testing.assert_allclose(best_reference_scores(latents[2], references, owner, 5), got[2], rtol=1e-6)
    shuffled = np.array([2, 0, 1])  # one reference each, in another order
    one_each = best_reference_scores(latents, references[:3], shuffled, 3)
    np.testing.assert_allclose(one_each[:, shuffled], sims[:, :3], rtol=1e-6)


def test_a_photo_from_a_raw_pipe_is_read_whole(sample_bundle):
    # an unbuffered stream returns what the pipe holds at the moment, not the whole photo
    import os
    import threading
    import time

    photo = (SAMPLE / "photos" / "Banana_001.jpg").read_bytes()
    read_end, write_end = os.pipe()

    def feed():
        with os.fdopen(write_end, "wb", buffering=0) as w:
            for i in range(0, len(photo), 4096):
                w.write(photo[i:i + 4096])
                time.sleep(0.005)  # the reader sees the photo arrive in pieces

    feeder = threading.Thread(target=feed)
    feeder.start()
    with io.FileIO(read_end, "rb") as raw:
        verdict = Verifier(sample_bundle).verify(raw, "Banana")
    feeder.join()
    import hashlib

    assert verdict.photo_sha256 == hashlib.sha256(photo).hexdigest()
    assert verdict.decision == "match"


def test_a_score_and_threshold_never_print_alike_in_a_comparison(verifier, sample_photos):
    from auditlens.device_app.verifier import score_against_threshold

    assert score_against_threshold(0.61234, 0.572, ">=") == "score 0.612 >= threshold 0.572"
    assert score_against_threshold(0.99961, 1.0, "<") == "score 0.9996 < threshold 1.0000"
    assert score_against_threshold(0.5720004, 0.572, ">=", word="Score") == "Score 0.572000 >= threshold 0.572000"
    strict = Verifier(verifier.bundle, VerifierOptions(threshold=5.0))  # above every score
    reason = strict.verify(sample_photos[0].photo, sample_photos[0].product_id).reasons[0]
    score, threshold = (float(w) for w in reason.split()[1::3])
    assert score < threshold == 5.0 and reason.split()[1] != reason.split()[4]
