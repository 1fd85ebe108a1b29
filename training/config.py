"""Everything a training run depends on, in one dataclass saved into ``report.json``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

BACKBONES = ("scratch", "mobilenet_v2")
"""Encoder bodies ``train --backbone`` builds (:mod:`auditlens.training.model`)."""
POOLINGS = ("avg", "avgmax", "attention")
"""Global poolings of the encoder's last feature map (``train --pooling``)."""


@dataclass
class TrainConfig:
    """Settings of one training run. The defaults are the shipped model's recipe except its
    ImageNet start (``backbone`` 'mobilenet_v2' with ``backbone_weights``, which you provide)."""

    catalog: str = ""
    """Catalogue of originals: a folder of images, a CSV or ``sqlite:///...``."""
    photos: str | None = None
    """Optional ``photo,product_id`` CSV of labelled field photos to train on."""
    val_photos: str | None = None
    """Optional ``photo,product_id`` CSV of field photos to validate on (else: augmented originals)."""
    out_dir: str = "runs/train"
    """Folder for the encoder, checkpoints, report and plots."""

    seed: int = 0
    """Seed of numpy, TensorFlow and Keras randomness: the starting weights, and the batches
    and augmentation too unless ``data_seed`` is given."""
    data_seed: int | None = None
    """Seed of the batches and the augmentation alone (default: ``seed``). Runs with one
    ``seed`` and different data seeds start from the same weights, so they can be souped."""
    input_size: int = 128
    """Side of the encoder's square input (the PreprocessSpec's input_size)."""
    crop: str = "center"
    """PreprocessSpec crop: 'center' or 'full'."""
    cache_scale: float = 4 / 3
    """Images are cached this much larger than the input, so random crops keep detail."""
    latent_dim: int = 128
    """Length of the latent vector."""
    width: int = 24
    """Encoder stem channels (doubles at each of the four stride-2 stages)."""
    head_channels: int = 256
    """Encoder channels before global pooling."""
    recon_size: int = 48
    """Side of the decoder's reconstruction of the clean original."""
    backbone: str = "scratch"
    """Encoder body: 'scratch' (the small network, ``width``) or 'mobilenet_v2' (the first
    ``trunk_blocks`` blocks of torchvision's ImageNet MobileNetV2, :mod:`auditlens.training.pretrained`)."""
    backbone_weights: str | None = None
    """torchvision's ``mobilenet_v2-b0353104.pth`` (read without torch) to start the
    'mobilenet_v2' trunk from; None: random initialisation."""
    trunk_blocks: int = 13
    """MobileNetV2 blocks kept by the 'mobilenet_v2' backbone."""
    pooling: str = "avg"
    """The encoder's global pooling: 'avg', 'avgmax' (average and maximum side by side), or
    'attention' (the average of the feature map weighted by a learnt 0..1 map of where the
    product is)."""
    backbone_lr_scale: float = 0.1
    """The pretrained trunk's learning rate relative to ``learning_rate`` (the new layers
    take the full rate): fine-tuning, not relearning, the ImageNet features."""
    freeze_blocks: int = 0
    """Keep the pretrained trunk's stem and its first this many blocks as ImageNet left
    them (weights and BatchNorm statistics), fine-tuning only the blocks after; 0: none."""
    freeze_late: int = 0
    """Keep the pretrained trunk's last this many blocks as ImageNet left them, fine-tuning
    the stem and the blocks before; 0: none."""

    epochs: int = 10
    """Epochs of the learning-rate schedule (the shipped model's: 10 of 150 steps, about an
    hour on a 2-core CPU with the pretrained trunk); ``minutes`` can stop the run earlier."""
    stop_epoch: int | None = None
    """Stop after this epoch, with the learning-rate schedule of ``epochs`` (still high
    there), and ship that epoch's encoder instead of the one best on trained products. An
    early stop keeps the encoder general: products enrolled after training verify best
    around epoch 9 to 10 of 25, while trained products keep gaining after it (docs/ablation.md)."""
    minutes: float | None = None
    """Wall-clock budget for training (checked after every step); None: run all epochs."""
    steps_per_epoch: int = 150
    """Optimizer steps between validations/checkpoints."""
    products_per_batch: int = 16
    """Distinct products in a batch (P of the P x K sampler)."""
    views_per_product: int = 4
    """Views per product in a batch: the clean original, augmented originals and photos."""
    group_pairs: float = 0.5
    """Share of a batch's products drawn as pairs from one coarse group (another brand of
    milk beside a milk): the hard negatives the contrastive loss would rarely meet in a
    random batch. 0: products drawn uniformly."""
    pseudo_products: int = 0
    """Extra made-up products per trained product (0 to 11): the product with its colour
    channels swapped and/or turned upside down, original and photos alike, each a class of
    its own. More classes to tell apart from a small catalogue."""
    pseudo_kinds: tuple[str, ...] = ()
    """Catalogue kinds (the ``kind`` column, case-insensitive) whose products get the made-up
    variants, e.g. ("Packages",): a carton with other colours is another product, a red
    pepper with red and green swapped looks like a green one. Empty: every product."""
    learning_rate: float = 2e-3
    """Peak AdamW learning rate (cosine decay over the run)."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    ema_decay: float = 0.998
    """Validate, keep and ship an exponential moving average of the encoder's weights with
    this decay per step (0: the raw weights). Smooths the epoch-to-epoch jumps of a small
    batch on a small catalogue."""
    bn_batches: int = 20
    """When the weights validated give every image nearly the same latent (a short run,
    whose BatchNorm moving statistics still hold their early values), recompute those
    statistics from this many training batches for the weights validated, kept and shipped
    (0: never). The shipped recipe's runs never trigger it."""
    keep_epochs: bool = False
    """Also save the (averaged) encoder after every epoch as ``checkpoints/encoder_epoch_NNN.keras``,
    so a checkpoint other than the one chosen on seen products can be exported later."""
    threads: int = 0
    """TensorFlow intra/inter-op threads; 0 lets TensorFlow decide (set 1 when runs share CPUs)."""

    metric_weight: float = 1.0
    """Weight of the supervised contrastive loss on L2-normalised latents."""
    class_weight: float = 0.5
    """Weight of the cosine-margin (CosFace) classification loss."""
    recon_weight: float = 1.0
    """Weight of the denoising reconstruction loss (augmented view in, clean original out)."""
    temperature: float = 0.1
    """Temperature of the supervised contrastive loss."""
    cosface_scale: float = 20.0
    """Scale s of the CosFace logits."""
    cosface_margin: float = 0.25
    """Margin m subtracted from the true class's cosine."""
    anchor_weight: float = 0.0
    """Weight of the original-anchored loss: each augmented view and photo in a batch against
    the batch's clean originals, with the CosFace scale and margin (0: off)."""
    arcface_margin: float = 0.0
    """When above 0, the head's loss is ArcFace instead: this angle (radians) is added to the
    true class's angle, and ``cosface_margin`` is not used."""
    teacher_features: str | None = None
    """Optional ``.npz`` of a pretrained model's features of every training image
    (:mod:`auditlens.training.teacher`): distil them into the latent."""
    distill_weight: float = 1.0
    """Weight of the distillation loss (used only with ``teacher_features``)."""

    augment: bool = True
    """Master switch of camera-capture augmentation (off: only the clean images)."""
    paste_background: bool = True
    """Paste originals (mask of non-white pixels) onto crops of real cluttered photos."""
    geometric: bool = True
    """Random resized crop, zoom-out, rotation and perspective."""
    photometric: bool = True
    """Brightness, contrast and saturation jitter, white balance and gamma shifts."""
    blur: bool = True
    """Gaussian (defocus) blur."""
    noise: bool = True
    """Sensor noise."""
    jpeg: bool = True
    """JPEG re-compression at random quality."""
    glare: bool = True
    """Additive specular glare blobs."""
    mirror: bool = True
    """Flip half the augmented views left-right, so the latent ignores left-right quirks."""

    holdout_fold: str | None = None
    """'k/K': hold out the k-th of K deterministic folds of product ids (1-based), for
    measuring products the model never saw."""
    max_photos_per_product: int | None = None
    """Cap on training photos per product (None: all)."""
    progress: bool = True
    """Show a progress bar."""
    overwrite: bool = False
    """Replace an earlier run's files in ``out_dir`` (otherwise such a folder is refused)."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class TrainResult:
    """What :func:`auditlens.training.train.train` produced."""

    out_dir: str
    """The run's folder."""
    encoder_path: str
    """``encoder.keras``: the best encoder (by validation EER)."""
    autoencoder_path: str
    """``autoencoder.keras``: encoder + decoder."""
    report_path: str
    """``report.json``."""
    best_epoch: int
    """Epoch whose encoder was kept."""
    metrics: dict = field(default_factory=dict)
    """Validation metrics of the kept encoder."""
    seconds: float = 0.0
    """Wall time of the whole run."""
    warnings: list[str] = field(default_factory=list)
    """What the engineer should know before exporting the encoder (validation photos that
    are training photos too, ...); the CLI prints them."""
