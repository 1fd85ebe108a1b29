"""Training objectives.

* :func:`supcon_loss`: supervised contrastive loss (Khosla et al. 2020) on L2-normalised
  latents. Every view of a product in the batch (its clean original, augmented originals,
  field photos) is a positive of every other; all other products are negatives. Without
  labelled photos the positives are simply augmented views of the same original, so the
  loss still works from a catalogue alone. It is what the device measures (cosine), so it
  carries most of the verification quality and transfers to products never seen.
* :class:`CosFaceHead` + :func:`cosface_loss`: cosine-margin classification over the
  training products (Wang et al. 2018). It tightens each product's cluster around one
  learnt centre; it is a training-only head and never ships. :func:`arcface_loss` is the
  additive angular margin variant of the same head (Deng et al. 2019), an option.
* :func:`original_anchor_loss`: the comparison the device makes, trained directly: each
  augmented view and field photo in the batch is classified among the batch's *clean
  originals* (their latents, not learnt centres), with the CosFace scale and margin.
* :func:`reconstruction_loss`: denoising reconstruction, the decoder must redraw the clean
  original from the latent of an augmented view or a field photo, so the latent has to keep
  the product's appearance instead of only what separates the training products.
* :func:`distill_loss`: feature distillation from a pretrained teacher
  (:mod:`auditlens.training.teacher`); a training-only linear head maps each latent into
  the teacher's feature space, and the loss is the cosine distance to the teacher's
  (centred, unit) feature of the clean image: the original's for an original and its
  augmented copies, the photo's own (unaugmented) for a field photo.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf


def l2_normalize(x: tf.Tensor) -> tf.Tensor:
    return tf.math.l2_normalize(x, axis=-1, epsilon=1e-12)


def supcon_loss(latents: tf.Tensor, labels: tf.Tensor, temperature: float = 0.1) -> tf.Tensor:
    """Supervised contrastive loss; anchors without any positive in the batch are skipped."""
    z = l2_normalize(latents)
    logits = tf.matmul(z, z, transpose_b=True) / temperature
    n = tf.shape(z)[0]
    not_self = 1.0 - tf.eye(n)
    labels = tf.reshape(labels, [-1])
    positives = tf.cast(tf.equal(labels[:, None], labels[None, :]), tf.float32) * not_self
    # log-softmax over all other samples (self excluded from the denominator)
    logits = logits - tf.stop_gradient(tf.reduce_max(logits, axis=1, keepdims=True))
    exp = tf.exp(logits) * not_self
    log_prob = logits - tf.math.log(tf.reduce_sum(exp, axis=1, keepdims=True) + 1e-12)
    n_pos = tf.reduce_sum(positives, axis=1)
    mean_log_prob = tf.reduce_sum(positives * log_prob, axis=1) / tf.maximum(n_pos, 1.0)
    has_pos = tf.cast(n_pos > 0, tf.float32)
    return -tf.reduce_sum(mean_log_prob * has_pos) / tf.maximum(tf.reduce_sum(has_pos), 1.0)


class CosFaceHead(keras.layers.Layer):
    """Cosine of a latent with one learnt centre per training product."""

    def __init__(self, num_classes: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_classes = num_classes

    def build(self, input_shape) -> None:
        self.centres = self.add_weight(
            name="centres", shape=(int(input_shape[-1]), self.num_classes),
            initializer="glorot_uniform", trainable=True,
        )

    def call(self, latents):
        return tf.matmul(l2_normalize(latents), tf.math.l2_normalize(self.centres, axis=0))


def _margin_softmax_loss(cosines: tf.Tensor, labels: tf.Tensor, scale: float, true_logit) -> tf.Tensor:
    """Cross-entropy on ``scale * cos``, the true product's cosine replaced by
    ``true_logit(cos)`` (the margin)."""
    onehot = tf.one_hot(tf.reshape(labels, [-1]), tf.shape(cosines)[1])
    logits = scale * tf.where(onehot > 0, true_logit(cosines), cosines)
    return tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(onehot, logits))


def cosface_loss(cosines: tf.Tensor, labels: tf.Tensor, scale: float = 20.0, margin: float = 0.25) -> tf.Tensor:
    """Large-margin cosine loss: cross-entropy on ``scale * (cos - margin * onehot)``."""
    return _margin_softmax_loss(cosines, labels, scale, lambda cos: cos - margin)


def arcface_loss(cosines: tf.Tensor, labels: tf.Tensor, scale: float = 20.0, margin: float = 0.3) -> tf.Tensor:
    """Additive angular margin loss: cross-entropy on ``scale * cos(theta + margin)`` for the
    true product and ``scale * cos(theta)`` for the others. Where ``theta + margin`` would pass
    pi (a latent nearly opposite its centre), ``cos(theta + margin)`` stops falling as theta
    grows, so the true logit becomes ``cos(theta) - margin * sin(margin)`` there: the usual
    fallback, which keeps it falling (within 0.05 of the curve at the switch, margin 0.3)."""
    def shifted(cos):
        cos = tf.clip_by_value(cos, -1.0 + 1e-6, 1.0 - 1e-6)  # sqrt's gradient at 1 is infinite
        sin = tf.sqrt(1.0 - cos * cos)
        added = cos * math.cos(margin) - sin * math.sin(margin)
        return tf.where(cos > math.cos(math.pi - margin), added, cos - margin * math.sin(margin))

    return _margin_softmax_loss(cosines, labels, scale, shifted)


def original_anchor_loss(latents: tf.Tensor, labels: tf.Tensor, n_originals: int | tf.Tensor,
                         scale: float = 20.0, margin: float = 0.25) -> tf.Tensor:
    """CosFace over the batch's clean originals: rows ``n_originals:`` of ``latents`` (views and
    photos) each against rows ``:n_originals`` (one clean original per label), the true
    original's cosine lowered by ``margin``. Every view's label must be one of the originals'."""
    z = l2_normalize(latents)
    labels = tf.reshape(labels, [-1])
    originals, views = z[:n_originals], z[n_originals:]
    own = tf.argmax(tf.cast(tf.equal(labels[n_originals:, None], labels[None, :n_originals]), tf.int32),
                    axis=1, output_type=tf.int32)
    return cosface_loss(tf.matmul(views, originals, transpose_b=True), own, scale, margin)


def reconstruction_loss(reconstruction: tf.Tensor, target: tf.Tensor) -> tf.Tensor:
    """Mean absolute error in 0..1 (L1 keeps edges and text sharper than L2)."""
    return tf.reduce_mean(tf.abs(reconstruction - target))


def distill_loss(projected: tf.Tensor, targets: tf.Tensor, weights: tf.Tensor) -> tf.Tensor:
    """Weighted mean of ``1 - cos(projected, target)`` per row; ``targets`` are unit vectors.

    Rows of weight 0 (images with no teacher feature, such as made-up products) add nothing;
    all weights 0 gives 0.
    """
    cosine = tf.reduce_sum(l2_normalize(projected) * targets, axis=-1)
    weights = tf.cast(weights, cosine.dtype)
    return tf.reduce_sum((1.0 - cosine) * weights) / tf.maximum(tf.reduce_sum(weights), 1.0)
