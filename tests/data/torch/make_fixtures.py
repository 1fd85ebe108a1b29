"""Writes the torch files that tests/test_pretrained.py reads (run once, by hand).

Needs torch and torchvision, which auditlens itself never needs:

    pip install torch torchvision numpy
    python tests/data/torch/make_fixtures.py

* ``mnv2_trunk3.pth`` (torch's legacy format) and ``mnv2_trunk3_zip.pth`` (the zip format
  of torch >= 1.6): the state dict of torchvision's MobileNetV2 ``features.0`` to
  ``features.3``, randomly initialised with seeded BatchNorm statistics, so a wrong
  layout, padding or epsilon shows in the output;
* ``mnv2_trunk3_expected.npz``: two fixed input images (already normalised, NHWC) and
  torchvision's output of those blocks in eval mode (NHWC);
* ``odd_tensors.pth`` and ``odd_tensors_expected.npz``: tensors that share one storage
  at an offset, a transposed (non-contiguous) view, float16, int64 and a 0-d tensor.
"""

from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torchvision

HERE = Path(__file__).parent
BLOCKS = 3


def main() -> None:
    torch.manual_seed(0)
    net = torchvision.models.mobilenet_v2(weights=None)
    trunk = net.features[: BLOCKS + 1].eval()
    with torch.no_grad():
        for module in trunk.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(torch.rand(n) + 0.5)
                module.bias.copy_(torch.randn(n) * 0.1)
                module.running_mean.copy_(torch.randn(n) * 0.1)
                module.running_var.copy_(torch.rand(n) + 0.5)
    state = OrderedDict((f"features.{k}", v) for k, v in trunk.state_dict().items())
    torch.save(state, HERE / "mnv2_trunk3.pth", _use_new_zipfile_serialization=False)
    torch.save(state, HERE / "mnv2_trunk3_zip.pth")
    x = torch.randn(2, 3, 36, 44)
    with torch.no_grad():
        y = trunk(x)
    np.savez(HERE / "mnv2_trunk3_expected.npz", inputs=x.permute(0, 2, 3, 1).numpy(),
             outputs=y.permute(0, 2, 3, 1).numpy())

    base = torch.arange(24, dtype=torch.float32)
    odd = OrderedDict([
        ("offset_view", base[5:11]),
        ("same_storage", base.view(4, 6)),
        ("transposed", torch.arange(12, dtype=torch.float32).view(3, 4).t()),
        ("half", torch.linspace(-2, 2, 7, dtype=torch.float16)),
        ("long", torch.tensor([[1, -2], [3, 2**40]], dtype=torch.int64)),
        ("scalar", torch.tensor(7, dtype=torch.int64)),
    ])
    torch.save(odd, HERE / "odd_tensors.pth", _use_new_zipfile_serialization=False)
    np.savez(HERE / "odd_tensors_expected.npz", **{k: v.numpy() for k, v in odd.items()})


if __name__ == "__main__":
    main()
