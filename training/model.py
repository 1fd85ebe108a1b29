"""The encoder/decoder pair: a tiny MobileNet-style encoder that quantizes cleanly to int8.

The encoder is what ships. Its graph holds only ops that TFLite runs natively in int8
(Conv2D, DepthwiseConv2D, folded BatchNorm, ReLU6, Add, global average or max pooling,
Concatenate, Dense; attention pooling adds a sigmoid and a Mul), takes
raw 0..255 pixels (so the int8 model's uint8 input is the camera pixels themselves) and
returns the *raw* latent: L2 normalisation happens in numpy on the device, because a
normalising op in the int8 graph would quantize the already-small latent twice.

The decoder exists only for the denoising reconstruction loss during training; it works at
a lower resolution (default 48x48) because it never ships and only has to make the latent
carry the product's appearance.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
from keras import layers

from auditlens.training.config import BACKBONES, POOLINGS

ENCODER_NAME = "auditlens_encoder"
DECODER_NAME = "auditlens_decoder"
ATTENTION_LAYER = "pool_attention"
"""The 1x1 convolution whose sigmoid weighs each position under ``pooling='attention'``."""


@dataclass(frozen=True)
class ModelSpec:
    """Shape of the encoder/decoder; small enough for < 1 MB int8 and <= 0.5 ms per image."""

    input_size: int = 96
    """Side of the square RGB input, in pixels."""
    latent_dim: int = 128
    """Length of the latent vector compared by cosine on the device."""
    width: int = 24
    """Channels of the stem; each stride-2 stage doubles them."""
    blocks: tuple[int, ...] = (1, 2, 2, 2)
    """Residual depthwise-separable blocks per stage (after each stride-2 reduction)."""
    head_channels: int = 256
    """Channels of the 1x1 expansion before global pooling (richer pooled features)."""
    recon_size: int = 48
    """Side of the decoder's reconstruction (the clean original, downscaled)."""
    backbone: str = "scratch"
    """'scratch': the small network above (``width``, ``blocks``); 'mobilenet_v2': the first
    ``trunk_blocks`` blocks of torchvision's MobileNetV2 (:mod:`auditlens.training.pretrained`),
    whose layer names start with ``mb``."""
    trunk_blocks: int = 13
    """MobileNetV2 blocks kept by the 'mobilenet_v2' backbone (13: up to the 96-channel stage)."""
    pooling: str = "avg"
    """How the head's feature map becomes one vector: 'avg' (global average) or 'avgmax'
    (global average and global maximum side by side: the strongest response of each
    channel anywhere in the frame, as a small logo or label gives it) or 'attention' (the
    feature map multiplied by a learnt 0..1 map of where the product is, then averaged
    over every position)."""



def _conv_bn(x, filters: int, kernel: int, stride: int, name: str, act: bool = True):
    x = layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return layers.ReLU(6.0, name=f"{name}_relu")(x) if act else x


def _separable(x, filters: int, stride: int, name: str):
    """Depthwise 3x3 + pointwise 1x1; a residual add when the shape is kept."""
    shortcut = x
    y = layers.DepthwiseConv2D(3, strides=stride, padding="same", use_bias=False, name=f"{name}_dw")(x)
    y = layers.BatchNormalization(name=f"{name}_dw_bn")(y)
    y = layers.ReLU(6.0, name=f"{name}_dw_relu")(y)
    y = layers.Conv2D(filters, 1, use_bias=False, name=f"{name}_pw")(y)
    y = layers.BatchNormalization(name=f"{name}_pw_bn")(y)
    if stride == 1 and shortcut.shape[-1] == filters:
        # Linear bottleneck: no activation before the add keeps the residual path exact.
        return layers.Add(name=f"{name}_add")([shortcut, y])
    return layers.ReLU(6.0, name=f"{name}_pw_relu")(y)


def build_encoder(spec: ModelSpec = ModelSpec(), backbone_state: dict | None = None) -> keras.Model:
    """Image (S, S, 3) float32 in 0..255 -> raw latent (latent_dim,).

    ``backbone_state``: torchvision MobileNetV2 weights (name -> array) loaded into the
    'mobilenet_v2' trunk; None leaves it randomly initialised."""
    inputs = keras.Input((spec.input_size, spec.input_size, 3), dtype="float32", name="image")
    # Input scaling lives in the graph so the device feeds raw pixels and the int8
    # converter folds it into the input quantization.
    if spec.backbone == "mobilenet_v2":
        from auditlens.training.pretrained import IMAGENET_MEAN, IMAGENET_STD, mobilenet_v2_trunk

        x = layers.Normalization(mean=[255.0 * m for m in IMAGENET_MEAN],
                                 variance=[(255.0 * s) ** 2 for s in IMAGENET_STD], name="imagenet_norm")(inputs)
        x = mobilenet_v2_trunk(x, spec.trunk_blocks, backbone_state)
    elif spec.backbone == "scratch":
        x = layers.Rescaling(1.0 / 127.5, offset=-1.0, name="rescale")(inputs)
        x = _conv_bn(x, spec.width, 3, 2, "stem")
        channels = spec.width
        for stage, repeats in enumerate(spec.blocks):
            channels *= 2
            x = _separable(x, channels, 2, f"s{stage}_down")
            for i in range(repeats):
                x = _separable(x, channels, 1, f"s{stage}_b{i}")
    else:
        raise ValueError(f"unknown backbone {spec.backbone!r}; choose from {', '.join(BACKBONES)}")
    x = _conv_bn(x, spec.head_channels, 1, 1, "head")
    if spec.pooling == "avgmax":
        x = layers.Concatenate(name="pool")([layers.GlobalAveragePooling2D(name="pool_avg")(x),
                                              layers.GlobalMaxPooling2D(name="pool_max")(x)])
    elif spec.pooling == "avg":
        x = layers.GlobalAveragePooling2D(name="pool")(x)
    elif spec.pooling == "attention":
        # a 1x1 convolution scores each position 0..1: the shelf, price tags and neighbours
        # around the product can be weighted down (it starts near 0.5 everywhere: averaging)
        where = layers.Conv2D(1, 1, activation="sigmoid", name=ATTENTION_LAYER)(x)
        x = layers.GlobalAveragePooling2D(name="pool")(layers.Multiply(name="pool_weighted")([x, where]))
    else:
        raise ValueError(f"unknown pooling {spec.pooling!r}; choose from {', '.join(POOLINGS)}")
    latent = layers.Dense(spec.latent_dim, name="latent")(x)
    return keras.Model(inputs, latent, name=ENCODER_NAME)


def build_decoder(spec: ModelSpec = ModelSpec()) -> keras.Model:
    """Latent -> reconstruction (recon_size, recon_size, 3) in 0..1 (training only)."""
    base = spec.recon_size // 8
    inputs = keras.Input((spec.latent_dim,), name="latent")
    x = layers.Dense(base * base * 128, name="dec_fc")(inputs)
    x = layers.Reshape((base, base, 128))(x)
    for i, filters in enumerate((96, 64, 32)):
        x = layers.UpSampling2D(2, interpolation="bilinear", name=f"dec_up{i}")(x)
        x = layers.Conv2D(filters, 3, padding="same", name=f"dec_conv{i}")(x)
        x = layers.BatchNormalization(name=f"dec_bn{i}")(x)
        x = layers.ReLU(name=f"dec_relu{i}")(x)
    outputs = layers.Conv2D(3, 3, padding="same", activation="sigmoid", name="dec_out")(x)
    return keras.Model(inputs, outputs, name=DECODER_NAME)


def build_autoencoder(encoder: keras.Model, decoder: keras.Model) -> keras.Model:
    """Encoder and decoder chained into one model (saved as ``autoencoder.keras``)."""
    inputs = keras.Input(encoder.input_shape[1:], dtype="float32", name="image")
    return keras.Model(inputs, decoder(encoder(inputs)), name="auditlens_autoencoder")
