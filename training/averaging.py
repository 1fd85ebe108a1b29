"""An exponential moving average of a model's weights, for validation and shipping.

A batch of 16 products out of a small catalogue makes the raw weights jump from step to
step; the average over the last few hundred steps is a steadier encoder and validates
better. Keras' optimizer option ``use_ema`` averages only trainable variables and writes
the average over the model in place; this one also averages the BatchNorm statistics (so
the normalisation matches the averaged weights) and can be swapped in and out for each
validation.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import tensorflow as tf


class WeightAverage:
    """Moving average of ``weights`` with a decay that grows towards ``decay``.

    The decay of update ``t`` is ``min(decay, (1 + t) / (10 + t))``: the first updates
    forget quickly, because the early weights are noise.

    Args:
        weights: the variables to average (e.g. ``encoder.weights``).
        decay: per-update decay in [0, 1); 0 makes the average a no-op.
    """

    def __init__(self, weights: Sequence[tf.Variable], decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must lie within [0, 1), not {decay}")
        self.decay = float(decay)
        self.weights = list(weights) if decay > 0 else []
        self.shadow = [tf.Variable(w, trainable=False, name=f"average_{i}") for i, w in enumerate(self.weights)]
        self.updates = tf.Variable(0.0, trainable=False, name="average_updates")

    @property
    def enabled(self) -> bool:
        return bool(self.weights)

    def update(self) -> None:
        """Fold the current weights into the average (callable inside ``tf.function``)."""
        if not self.enabled:
            return
        self.updates.assign_add(1.0)
        decay = tf.minimum(self.decay, (1.0 + self.updates) / (10.0 + self.updates))
        for shadow, weight in zip(self.shadow, self.weights):
            shadow.assign(decay * shadow + (1.0 - decay) * weight)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Within the block the weights hold the average; the raw ones come back after."""
        raw = [w.numpy() for w in self.weights]
        for weight, shadow in zip(self.weights, self.shadow):
            weight.assign(shadow)
        try:
            yield
        finally:
            for weight, value in zip(self.weights, raw):
                weight.assign(value)

    def values(self) -> list[np.ndarray]:
        return [s.numpy() for s in self.shadow]
