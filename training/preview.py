"""What a trained encoder keeps and where it looks: ``latent_preview.png`` of a run.

Each sample (a few trained originals, then validation photos) is a strip of square panels,
two strips to a row: the encoder's input; the decoder's redrawing of its latent (what the
latent keeps of the product: colours, layout, not the fine print); and, for an
attention-pooled encoder (``--pooling attention``), the input lit by the pooling weights
relative to that sample's largest (dark where the encoder looks away, such as the white
studio background of an original).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

SAMPLE_COLUMNS = 2
"""Samples side by side in the PNG; each takes two or three panels."""


def attention_maps(encoder, images: np.ndarray) -> np.ndarray | None:
    """The pooling weights (N, h, w) of an attention-pooled encoder on uint8 ``images``,
    0..1; None for an encoder pooled another way."""
    import keras

    from auditlens.training.model import ATTENTION_LAYER

    try:
        layer = encoder.get_layer(ATTENTION_LAYER)
    except ValueError:
        return None
    probe = keras.Model(encoder.input, layer.output)  # one input tensor, as the encoder is called
    return np.asarray(probe(images.astype(np.float32), training=False))[..., 0]


def light_by(image: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``image`` (S, S, 3) uint8 darkened where ``weights`` (h, w) is low, relative to its
    largest weight: the most weighted position keeps its pixels, none goes below a fifth."""
    side = image.shape[0]
    scaled = Image.fromarray(weights.astype(np.float32)).resize((side, side), Image.Resampling.BILINEAR)
    light = np.asarray(scaled) / max(float(weights.max()), 1e-6)
    return (image * (0.2 + 0.8 * np.clip(light, 0, 1))[..., None]).astype(np.uint8)


def preview_panels(encoder, decoder, images: np.ndarray) -> np.ndarray:
    """Panels (N, P, S, S, 3) uint8 of ``images`` (N, S, S, 3): input, reconstruction and,
    for an attention-pooled encoder, the input lit by its weights (P = 2 or 3)."""
    images = np.asarray(images, dtype=np.uint8)
    side = images.shape[1]
    latents = encoder(images.astype(np.float32), training=False)
    redrawn = np.clip(np.asarray(decoder(latents, training=False)) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    redrawn = np.stack([np.asarray(Image.fromarray(r).resize((side, side), Image.Resampling.BILINEAR))
                        for r in redrawn])
    panels = [images, redrawn]
    maps = attention_maps(encoder, images)
    if maps is not None:
        panels.append(np.stack([light_by(img, m) for img, m in zip(images, maps)]))
    return np.stack(panels, axis=1)


def save_latent_preview(encoder, decoder, images: np.ndarray, path: str | Path) -> Path:
    """Write :func:`preview_panels` of ``images`` as one PNG, :data:`SAMPLE_COLUMNS`
    samples a row (a missing last sample is left black)."""
    panels = preview_panels(encoder, decoder, images)
    n, count, side = panels.shape[0], panels.shape[1], panels.shape[2]
    rows = -(-n // SAMPLE_COLUMNS)
    grid = np.zeros((rows * side, SAMPLE_COLUMNS * count * side, 3), np.uint8)
    for i in range(n):
        r, c = divmod(i, SAMPLE_COLUMNS)
        grid[r * side:(r + 1) * side, c * count * side:(c + 1) * count * side] = np.concatenate(panels[i], axis=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    return path
