"""The torch-free reader of torchvision weights and the MobileNetV2 trunk built from them.

The files under tests/data/torch were written by torch and torchvision themselves
(tests/data/torch/make_fixtures.py), so these tests hold the reader and the Keras layout
to what torch wrote and computed, not to a writer of our own.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from auditlens.errors import AuditlensError
from tests.test_training import tiny_config, tiny_data  # noqa: F401  (fixture)

DATA = Path(__file__).parent / "data" / "torch"
TRUNK_BLOCKS = 3  # what make_fixtures.py saved: features.0 to features.3


def read(name: str) -> dict:
    from auditlens.training.pretrained import read_torch_state_dict

    return read_torch_state_dict(DATA / name)


def test_legacy_and_zip_files_read_alike():
    legacy, zipped = read("mnv2_trunk3.pth"), read("mnv2_trunk3_zip.pth")
    assert list(legacy) == list(zipped)
    assert "features.3.conv.1.0.weight" in legacy
    for name in legacy:
        np.testing.assert_array_equal(legacy[name], zipped[name])
    assert legacy["features.0.0.weight"].shape == (32, 3, 3, 3)
    assert legacy["features.0.0.weight"].dtype == np.float32


def test_views_offsets_and_dtypes_come_out_as_torch_saved_them():
    got = read("odd_tensors.pth")
    expected = np.load(DATA / "odd_tensors_expected.npz")
    assert sorted(got) == sorted(expected.files)
    for name in expected.files:
        assert got[name].dtype == expected[name].dtype, name
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    assert got["long"][1, 1] == 2**40  # int64 kept whole
    assert got["scalar"].shape == ()


def test_keras_trunk_computes_what_torchvision_computes():
    import keras

    from auditlens.training.pretrained import mobilenet_v2_trunk

    expected = np.load(DATA / "mnv2_trunk3_expected.npz")
    inputs = keras.Input(expected["inputs"].shape[1:])
    model = keras.Model(inputs, mobilenet_v2_trunk(inputs, TRUNK_BLOCKS, read("mnv2_trunk3.pth")))
    out = model.predict(expected["inputs"], verbose=0)
    assert out.shape == expected["outputs"].shape  # 36x44 -> 9x11 after two strided blocks
    np.testing.assert_allclose(out, expected["outputs"], atol=2e-4, rtol=1e-4)


def test_a_file_that_is_not_only_tensors_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"features.0.0.weight": Payload()}))
    with pytest.raises(AuditlensError, match="not only tensors"):
        read(path)
    assert not marker.exists()


def test_truncated_or_foreign_files_are_refused(tmp_path):
    whole = (DATA / "mnv2_trunk3.pth").read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(whole[: len(whole) * 2 // 3])
    with pytest.raises(AuditlensError, match="truncated|not a readable"):
        read(cut)
    text = tmp_path / "notes.pth"
    text.write_text("not weights")
    with pytest.raises(AuditlensError, match="not a readable"):
        read(text)
    with pytest.raises(AuditlensError, match="not found"):
        read(tmp_path / "missing.pth")


def test_weights_of_another_network_are_refused_by_name():
    import keras

    from auditlens.training.pretrained import mobilenet_v2_trunk

    inputs = keras.Input((32, 32, 3))
    with pytest.raises(AuditlensError, match="lacks features.0.0.weight"):
        mobilenet_v2_trunk(inputs, TRUNK_BLOCKS, read("odd_tensors.pth"))
    with pytest.raises(AuditlensError, match="lacks features.4"):  # asks for more blocks than saved
        mobilenet_v2_trunk(keras.Input((32, 32, 3)), 4, read("mnv2_trunk3.pth"))


def test_training_starts_from_the_file_and_a_zero_trunk_rate_keeps_it(tiny_data, tmp_path):  # noqa: F811
    import keras

    from auditlens.training.train import train

    config = tiny_config(tmp_path / "run", tiny_data["catalog"], photos=str(tiny_data["train"]),
                         backbone="mobilenet_v2", backbone_weights=str(DATA / "mnv2_trunk3.pth"),
                         trunk_blocks=TRUNK_BLOCKS, backbone_lr_scale=0.0, ema_decay=0.0)
    result = train(config)
    encoder = keras.models.load_model(result.encoder_path)
    state = read("mnv2_trunk3.pth")
    stem = encoder.get_layer("mb_stem_conv").get_weights()[0]
    np.testing.assert_array_equal(stem, state["features.0.0.weight"].transpose(2, 3, 1, 0))
    project = encoder.get_layer("mb3_project_conv").get_weights()[0]
    np.testing.assert_array_equal(project, state["features.3.conv.2.weight"].transpose(2, 3, 1, 0))
    report = json.loads(Path(result.report_path).read_text())
    assert report["model"]["backbone"] == "mobilenet_v2"
    assert report["config"]["backbone_weights"] == str(DATA / "mnv2_trunk3.pth")


def _trained_with_frozen_blocks(data, tmp_path, **freeze):
    """The encoder of a short run on ``data`` (the tiny data set) from the 3-block trunk
    file with ``freeze`` (the trunk at the full learning rate, raw weights), and the file's
    tensors."""
    import keras

    from auditlens.training.train import train

    config = tiny_config(tmp_path / "run", data["catalog"], photos=str(data["train"]),
                         backbone="mobilenet_v2", backbone_weights=str(DATA / "mnv2_trunk3.pth"),
                         trunk_blocks=TRUNK_BLOCKS, backbone_lr_scale=1.0, ema_decay=0.0, **freeze)
    return keras.models.load_model(train(config).encoder_path), read("mnv2_trunk3.pth")


def _conv(state, key):  # a torch convolution's weights as Keras holds them
    return state[key].transpose(2, 3, 1, 0)


def test_frozen_blocks_keep_their_imagenet_weights_and_statistics(tiny_data, tmp_path):  # noqa: F811
    """--freeze-blocks 2: the stem and blocks 1-2 end as loaded, BatchNorm's running
    statistics included; block 3 trains."""
    from auditlens.training.train import train

    encoder, state = _trained_with_frozen_blocks(tiny_data, tmp_path, freeze_blocks=2)
    np.testing.assert_array_equal(encoder.get_layer("mb_stem_conv").get_weights()[0],
                                  _conv(state, "features.0.0.weight"))
    np.testing.assert_array_equal(encoder.get_layer("mb2_project_conv").get_weights()[0],
                                  _conv(state, "features.2.conv.2.weight"))
    gamma, beta, mean, var = encoder.get_layer("mb2_project_bn").get_weights()
    np.testing.assert_array_equal(mean, state["features.2.conv.3.running_mean"])
    np.testing.assert_array_equal(var, state["features.2.conv.3.running_var"])
    trained = encoder.get_layer("mb3_project_conv").get_weights()[0]
    assert np.abs(trained - _conv(state, "features.3.conv.2.weight")).max() > 1e-4
    moved = encoder.get_layer("mb3_project_bn").get_weights()[2]  # block 3's statistics follow the data
    assert np.abs(moved - state["features.3.conv.3.running_mean"]).max() > 1e-4
    for bad, said in (({"freeze_blocks": 3}, "must leave a block of the 3-block trunk"),
                      ({"freeze_blocks": 2, "freeze_late": 1}, "must leave a block of the 3-block trunk"),
                      ({"freeze_late": -1}, "must leave a block"),
                      ({"freeze_blocks": 1, "backbone_weights": None}, "need --backbone mobilenet_v2 and")):
        with pytest.raises(ValueError, match=said):
            train(tiny_config(tmp_path / "bad", tiny_data["catalog"], backbone="mobilenet_v2",
                              trunk_blocks=TRUNK_BLOCKS, **{"backbone_weights": str(DATA / "mnv2_trunk3.pth"), **bad}))


def test_late_frozen_blocks_keep_their_weights_while_the_stem_trains(tiny_data, tmp_path):  # noqa: F811
    """--freeze-late 1: the last block ends as loaded, the stem and blocks before train."""
    encoder, state = _trained_with_frozen_blocks(tiny_data, tmp_path, freeze_late=1)
    np.testing.assert_array_equal(encoder.get_layer("mb3_project_conv").get_weights()[0],
                                  _conv(state, "features.3.conv.2.weight"))
    np.testing.assert_array_equal(encoder.get_layer("mb3_project_bn").get_weights()[2],
                                  state["features.3.conv.3.running_mean"])
    stem = encoder.get_layer("mb_stem_conv").get_weights()[0]
    assert np.abs(stem - _conv(state, "features.0.0.weight")).max() > 1e-4


def test_backbone_weights_need_the_mobilenet_backbone(tiny_data, tmp_path, capsys):  # noqa: F811
    from auditlens.cli import main

    code = main(["train", str(tiny_data["catalog"]), "--out", str(tmp_path / "run"),
                 "--backbone-weights", str(DATA / "mnv2_trunk3.pth"), "--quiet"])
    assert code == 2
    assert "--backbone-weights needs --backbone mobilenet_v2" in capsys.readouterr().err


def test_a_file_named_with_a_hash_must_have_that_hash(tmp_path):
    """torchvision's NAME-HASH.pth convention: a copy whose bytes differ from its name's
    sha256 prefix is refused before it is unpickled; the same bytes correctly named load."""
    import hashlib
    import shutil

    from auditlens.errors import AuditlensError
    from auditlens.training.pretrained import read_torch_state_dict

    source = DATA / "mnv2_trunk3.pth"
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    good = tmp_path / f"mnv2-{digest[:8]}.pth"
    shutil.copy(source, good)
    assert "features.0.0.weight" in read_torch_state_dict(good)
    wrong = "0" * 8 if not digest.startswith("0" * 8) else "1" * 8
    bad = tmp_path / f"mobilenet_v2-{wrong}.pth"
    shutil.copy(source, bad)
    with pytest.raises(AuditlensError, match=f"sha256 begins {digest[:8]}, not {wrong}"):
        read_torch_state_dict(bad)


def test_a_mobilenet_trunk_without_its_weights_file_is_said_to_start_at_random():
    """A review trained --backbone mobilenet_v2 without --backbone-weights: the trunk
    started from random weights and nothing said so (report.json: backbone_weights null)."""
    from auditlens.training.config import TrainConfig
    from auditlens.training.train import _random_trunk_note

    note = _random_trunk_note(TrainConfig(backbone="mobilenet_v2"))
    assert "start from random weights, not ImageNet's" in note and "--backbone-weights" in note
    assert _random_trunk_note(TrainConfig(backbone="mobilenet_v2", backbone_weights="w.pth")) is None
    assert _random_trunk_note(TrainConfig()) is None  # the small encoder always starts at random
