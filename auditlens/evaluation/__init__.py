"""Measuring and calibrating verification: metrics, the evaluation protocol, reports.

Engine-only (numpy, Pillow, LiteRT); matplotlib is imported only to draw plots. No
TensorFlow: a bundle is evaluated with the int8 model the device runs.

* :mod:`.metrics`: ROC AUC, EER, TAR at FAR, threshold for a FAR, top-k identification;
* :mod:`.protocol`: which photo/product pairs are scored (the evaluation protocol);
* :mod:`.evaluate`: ``auditlens evaluate``, a JSON report with ROC/DET/score plots;
* :mod:`.calibrate`: ``auditlens calibrate``, the decision threshold for a target
  false-accept rate, written into the bundle.
"""
