"""Camera-capture augmentation: make a studio original look like a field photo.

A catalogue original is a clean product on white; a field photo is the same product on a
shelf, tilted, under store lighting, blurred, noisy and JPEG-compressed, sometimes with
glare on the packaging. The encoder has to map both to the same latent, so training shows
it originals degraded in all of these ways:

* geometric: random resized crop that also zooms *out* (the product small in the frame),
  rotation and perspective (Keras ``RandomRotation``/``RandomPerspective``);
* background pasting: the original's non-white pixels (a mask flood-filled from the border,
  so white packaging inside the product stays) pasted onto crops of real cluttered photos;
* photometric: brightness/contrast (Keras ``RandomBrightness``/``RandomContrast``),
  saturation, white-balance gains and gamma (tf ops: Keras' colour layers have per-layer
  factor conventions that are easy to get wrong, these are explicit);
* optics and sensor: Gaussian defocus blur, additive specular glare, sensor noise, JPEG
  re-compression at random quality;
* mirroring: half the views are flipped left-right, so a photo and its mirror image get
  the same latent (averaging the two at verification lifted a model trained without
  this; one trained with it gains nothing from the extra view: docs/ablation.md).

Everything runs batched inside the TensorFlow training step (the CPU is the bottleneck;
no per-image Python). Inputs are uint8 caches ``C x C`` (a bit larger than the model input
``S``), outputs float32 ``(B, S, S, 3)`` in 0..255, rounded like a real uint8 capture.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from PIL import Image

WHITE_THRESHOLD = 235
"""A pixel whose every channel is at least this is 'studio white' (background candidate)."""


@dataclass(frozen=True)
class AugmentSwitches:
    """Which augmentation families are on (mirrors the TrainConfig switches)."""

    paste_background: bool = True
    geometric: bool = True
    photometric: bool = True
    blur: bool = True
    noise: bool = True
    jpeg: bool = True
    glare: bool = True
    mirror: bool = True

    @classmethod
    def from_config(cls, config) -> AugmentSwitches:
        if not config.augment:
            return cls(False, False, False, False, False, False, False, False)
        return cls(
            config.paste_background, config.geometric, config.photometric,
            config.blur, config.noise, config.jpeg, config.glare, config.mirror,
        )


def object_mask(image: np.ndarray, threshold: int = WHITE_THRESHOLD) -> np.ndarray:
    """Mask (H, W) uint8, 255 on the product, 0 on the white studio background.

    Background is near-white *connected to the border*: a white carton or label inside the
    product is not background (a plain threshold would punch holes in milk cartons).
    """
    white = np.all(image >= threshold, axis=-1)
    background = np.zeros_like(white)
    background[0, :], background[-1, :] = white[0, :], white[-1, :]
    background[:, 0], background[:, -1] = white[:, 0], white[:, -1]
    while True:  # grow from the border through white pixels (4-connectivity)
        grown = background.copy()
        grown[1:] |= background[:-1]
        grown[:-1] |= background[1:]
        grown[:, 1:] |= background[:, :-1]
        grown[:, :-1] |= background[:, 1:]
        grown &= white
        if np.array_equal(grown, background):
            break
        background = grown
    mask = (~background).astype(np.uint8) * 255
    if mask.mean() < 255 * 0.02:  # nothing found (e.g. an all-white image): keep it all
        mask[:] = 255
    return mask


def _gaussian_kernel(sigma: float, radius: int) -> tf.Tensor:
    x = np.arange(-radius, radius + 1, dtype=np.float32)
    k = np.exp(-(x**2) / (2 * sigma**2))
    k /= k.sum()
    kernel = np.outer(k, k)[:, :, None, None] * np.ones((1, 1, 3, 1), np.float32)
    return tf.constant(kernel)


class CaptureAugmenter:
    """Batched camera-capture augmentation of originals and field photos.

    Args:
        input_size: side S of the output (the model input).
        backgrounds: uint8 (N, C, C, 3) pool of cluttered scenes to paste originals on
            (crops of in-store photos; without photos, other originals serve as clutter).
        switches: which augmentation families are on.
        seed: seed of every random draw (Keras layers and the tf.random.Generator).
    """

    def __init__(
        self,
        input_size: int,
        backgrounds: np.ndarray | None,
        switches: AugmentSwitches = AugmentSwitches(),
        seed: int = 0,
    ) -> None:
        self.size = int(input_size)
        self.switches = switches
        self.rng = tf.random.Generator.from_seed(seed)
        self.backgrounds = (
            tf.constant(backgrounds, tf.uint8) if backgrounds is not None and len(backgrounds) else None
        )
        # Originals carry an inverted mask as 4th channel; filling with 255 means "white
        # studio background" in all four channels, so pasting later replaces it.
        self.rotate_original = keras.layers.RandomRotation(
            0.06, fill_mode="constant", fill_value=255.0, seed=seed + 1)
        self.perspective = keras.layers.RandomPerspective(
            factor=0.7, scale=0.35, fill_value=255.0, seed=seed + 2)
        self.rotate_photo = keras.layers.RandomRotation(0.03, fill_mode="reflect", seed=seed + 3)
        self.brightness = keras.layers.RandomBrightness(0.2, value_range=(0, 255), seed=seed + 4)
        self.contrast = keras.layers.RandomContrast(0.35, value_range=(0, 255), seed=seed + 5)
        self.blur_kernel = _gaussian_kernel(1.2, 3)

    # -- building blocks -------------------------------------------------------------
    def _u(self, n, lo: float, hi: float, shape=()) -> tf.Tensor:
        return self.rng.uniform(tf.concat([[n], tf.constant(shape, tf.int32)], 0), lo, hi)

    def _bernoulli(self, n, p: float) -> tf.Tensor:
        return tf.cast(self.rng.uniform([n]) < p, tf.float32)

    def _resized_crop(self, images, side_lo, side_hi, centre_jitter, extrapolation=255.0,
                      inside=False):
        """Random (possibly zoomed-out) square-ish crops, resized to S.

        ``inside``: the box stays within the image (field photos, backgrounds: a box
        running off the frame would be filled with studio white, the very cue that tells
        an original from a photo); ``centre_jitter`` 1 then lets it reach any edge.
        Otherwise the centre moves by up to ``centre_jitter * |1 - side|``: originals
        zoomed out (side > 1) sit anywhere in their white frame, and may touch its edge."""
        n = tf.shape(images)[0]
        side = self._u(n, side_lo, side_hi)
        aspect = tf.exp(self._u(n, -0.15, 0.15))
        h, w = side * tf.sqrt(aspect), side / tf.sqrt(aspect)
        reach = 0.5 if inside else 1.0
        if inside:
            h, w = tf.minimum(h, 1.0), tf.minimum(w, 1.0)
        cy = 0.5 + self._u(n, -centre_jitter, centre_jitter) * tf.abs(1.0 - h) * reach
        cx = 0.5 + self._u(n, -centre_jitter, centre_jitter) * tf.abs(1.0 - w) * reach
        boxes = tf.stack([cy - h / 2, cx - w / 2, cy + h / 2, cx + w / 2], axis=1)
        return tf.image.crop_and_resize(
            tf.cast(images, tf.float32), boxes, tf.range(n), [self.size, self.size],
            extrapolation_value=extrapolation,
        )

    def _background(self, n) -> tf.Tensor:
        idx = self.rng.uniform([n], 0, tf.shape(self.backgrounds)[0], dtype=tf.int32)
        return self._resized_crop(tf.gather(self.backgrounds, idx), 0.3, 1.0, 1.0, inside=True)

    def _photometric(self, x, strength: float = 1.0):
        n = tf.shape(x)[0]
        x = self.brightness(x, training=True)
        x = self.contrast(x, training=True)
        grey = tf.reduce_mean(x, axis=-1, keepdims=True)
        sat = self._u(n, 1 - 0.4 * strength, 1 + 0.4 * strength, (1, 1, 1))
        x = grey + (x - grey) * sat
        # White balance: per-channel gains, as under tungsten/fluorescent store lights.
        gains = tf.exp(self._u(n, -0.12 * strength, 0.12 * strength, (1, 1, 3)))
        x = tf.clip_by_value(x * gains, 0.0, 255.0)
        gamma = tf.exp(self._u(n, -0.25 * strength, 0.25 * strength, (1, 1, 1)))
        return 255.0 * tf.pow(x / 255.0 + 1e-6, gamma)

    @staticmethod
    def _convolve_reflected(x, kernel):
        """Depthwise convolution over edges reflected outwards: zero ("SAME") padding would
        darken a frame as wide as the kernel's radius, a mark no real capture carries.

        An empty batch (training from originals alone) comes back as it went in: on some
        processors (AVX-512 oneDNN kernels) TensorFlow's CPU depthwise convolution returns
        it at its padded size instead."""
        ry, rx = kernel.shape[0] // 2, kernel.shape[1] // 2

        def convolve():
            padded = tf.pad(x, [[0, 0], [ry, ry], [rx, rx], [0, 0]], "SYMMETRIC")
            return tf.nn.depthwise_conv2d(padded, kernel, [1, 1, 1, 1], "VALID")

        return tf.cond(tf.shape(x)[0] > 0, convolve, lambda: x)

    def _blur(self, x, p: float):
        n = tf.shape(x)[0]
        once = self._convolve_reflected(x, self.blur_kernel)
        twice = self._convolve_reflected(once, self.blur_kernel)
        # Mixing sharp, sigma 1.2 and sigma ~1.7 gives a continuum of defocus levels.
        amount = self._bernoulli(n, p) * self._u(n, 0.0, 2.0)
        amount = tf.reshape(amount, [-1, 1, 1, 1])
        first = tf.minimum(amount, 1.0)
        second = tf.maximum(amount - 1.0, 0.0)
        return x * (1 - first) + once * (first - second) + twice * second

    def _glare(self, x, p: float):
        n = tf.shape(x)[0]
        grid = (tf.range(self.size, dtype=tf.float32) + 0.5) / self.size
        yy, xx = tf.meshgrid(grid, grid, indexing="ij")
        cy = tf.reshape(self._u(n, 0.1, 0.9), [-1, 1, 1])
        cx = tf.reshape(self._u(n, 0.1, 0.9), [-1, 1, 1])
        radius = tf.reshape(self._u(n, 0.05, 0.3), [-1, 1, 1])
        strength = tf.reshape(self._u(n, 0.4, 1.0) * self._bernoulli(n, p), [-1, 1, 1])
        blob = strength * tf.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius**2))
        blob = blob[..., None]
        return x + (255.0 - x) * blob

    def _noise(self, x, p: float):
        n = tf.shape(x)[0]
        sigma = tf.reshape(self._u(n, 0.0, 7.0) * self._bernoulli(n, p), [-1, 1, 1, 1])
        return x + sigma * self.rng.normal(tf.shape(x))

    def _jpeg(self, x):
        n = tf.shape(x)[0]
        quality = self.rng.uniform([n], 25, 96, dtype=tf.int32)
        as_uint8 = tf.cast(tf.clip_by_value(tf.round(x), 0, 255), tf.uint8)
        side = [self.size, self.size, 3]
        # A fully defined element shape lets map_fn stack an empty batch too.
        out = tf.map_fn(
            lambda args: tf.ensure_shape(tf.image.adjust_jpeg_quality(args[0], args[1]), side),
            (as_uint8, quality), fn_output_signature=tf.TensorSpec(side, tf.uint8),
        )
        return tf.cast(out, tf.float32)

    def _mirror(self, x):
        flip = tf.reshape(self._bernoulli(tf.shape(x)[0], 0.5), [-1, 1, 1, 1])
        return flip * tf.reverse(x, axis=[2]) + (1.0 - flip) * x

    def _finish(self, x, strength: float):
        s = self.switches
        if s.mirror:
            x = self._mirror(x)
        if s.photometric:
            x = self._photometric(x, strength)
        if s.blur:
            x = self._blur(x, 0.5 * strength)
        if s.glare:
            x = self._glare(tf.clip_by_value(x, 0.0, 255.0), 0.3 * strength)
        if s.noise:
            x = self._noise(x, 0.6)
        x = tf.clip_by_value(x, 0.0, 255.0)
        if s.jpeg:
            x = self._jpeg(x)
        return tf.round(x)  # the device sees uint8 pixels

    # -- public ------------------------------------------------------------------------
    def originals(self, images: tf.Tensor, masks: tf.Tensor) -> tf.Tensor:
        """Studio originals -> synthetic field captures.

        Args:
            images: uint8 (B, C, C, 3) cached originals.
            masks: uint8 (B, C, C, 1) from :func:`object_mask` (255 = product).
        """
        s = self.switches
        stacked = tf.concat([tf.cast(images, tf.float32), 255.0 - tf.cast(masks, tf.float32)], -1)
        if s.geometric:
            # Sides > 1 zoom out: the product shrinks into a frame of studio white.
            stacked = self._resized_crop(stacked, 0.8, 1.7, 0.6)
            stacked = self.rotate_original(stacked, training=True)
            stacked = self.perspective(stacked, training=True)
        else:
            stacked = tf.image.resize(stacked, [self.size, self.size], antialias=True)
        rgb = stacked[..., :3]
        if s.paste_background and self.backgrounds is not None:
            n = tf.shape(rgb)[0]
            # Soften the mask edge by a pixel, as a real object boundary is blurred.
            alpha = 1.0 - tf.clip_by_value(stacked[..., 3:] / 255.0, 0.0, 1.0)
            alpha = tf.nn.avg_pool2d(alpha, 3, 1, "SAME")
            alpha = tf.maximum(alpha, tf.reshape(1.0 - self._bernoulli(n, 0.85), [-1, 1, 1, 1]))
            rgb = alpha * rgb + (1.0 - alpha) * self._background(n)
        return self._finish(rgb, 1.0)

    def photos(self, images: tf.Tensor) -> tf.Tensor:
        """Field photos -> more field photos (milder: they are already real captures)."""
        x = tf.cast(images, tf.float32)
        if self.switches.geometric:
            x = self._resized_crop(x, 0.6, 1.0, 1.0, inside=True)
            x = self.rotate_photo(x, training=True)
        else:
            x = tf.image.resize(x, [self.size, self.size], antialias=True)
        return self._finish(x, 0.6)


def pseudo_variants(count: int) -> list[tuple[tuple[int, int, int], bool]]:
    """The identity and ``count`` made-up product variants: (colour channel order, upside down).

    The 5 other orders of the RGB channels come first, then the 6 orders turned upside down.
    A channel swap changes a product's colours far beyond any white-balance shift of the
    capture augmentation, so a swapped product is a different product to tell apart.
    """
    from itertools import permutations

    every = [(perm, flip) for flip in (False, True) for perm in permutations(range(3))]
    if not 0 <= count < len(every):
        raise ValueError(f"pseudo_products must be between 0 and {len(every) - 1}, got {count}")
    return every[: count + 1]


def variant_images(variants: list[tuple[tuple[int, int, int], bool]]):
    """A function ``(images (B, H, W, 3), variant (B,)) -> images``: each image as the
    variant of :func:`pseudo_variants` its index names (0: unchanged). With the identity
    alone (no made-up products) it returns the images as they are, adding no op to a step."""
    if len(variants) == 1:
        return lambda images, variant: images
    channel_order = tf.constant([perm for perm, _ in variants], tf.int32)
    upside_down = tf.constant([flip for _, flip in variants], tf.bool)

    def apply(images, variant):
        images = tf.gather(images, tf.gather(channel_order, variant), axis=3, batch_dims=1)
        flip = tf.gather(upside_down, variant)[:, None, None, None]
        return tf.where(flip, tf.reverse(images, [1, 2]), images)

    return apply


def save_augment_grid(
    augmenter: CaptureAugmenter,
    originals: np.ndarray,
    masks: np.ndarray,
    path: str | Path,
    clean: np.ndarray | None = None,
    photos: np.ndarray | None = None,
    views: int = 7,
) -> Path:
    """Write a PNG grid: per row one product, its clean input, then augmented views.

    Rows of field photos (augmented) follow when ``photos`` is given, for comparison.
    """
    rows: list[np.ndarray] = []
    size = augmenter.size
    for i in range(len(originals)):
        batch_img = np.repeat(originals[i : i + 1], views, axis=0)
        batch_mask = np.repeat(masks[i : i + 1], views, axis=0)
        aug = augmenter.originals(tf.constant(batch_img), tf.constant(batch_mask)).numpy()
        first = clean[i] if clean is not None else np.asarray(
            Image.fromarray(originals[i]).resize((size, size), Image.Resampling.BILINEAR))
        rows.append(np.concatenate([first.astype(np.uint8), *aug.astype(np.uint8)], axis=1))
    if photos is not None and len(photos):
        per_row = views + 1
        for start in range(0, min(len(photos), 2 * per_row), per_row):
            chunk = photos[start : start + per_row]
            aug = augmenter.photos(tf.constant(chunk)).numpy().astype(np.uint8)
            pad = [np.zeros((size, size, 3), np.uint8)] * (per_row - len(aug))
            rows.append(np.concatenate([*aug, *pad], axis=1))
    grid = np.concatenate(rows, axis=0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    return path


def cache_size(input_size: int, scale: float) -> int:
    """Side of the cached copy random crops are cut from (even, at least the input)."""
    return max(input_size, 2 * math.ceil(input_size * scale / 2))
