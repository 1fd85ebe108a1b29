"""A second look at photos whose score lands near the threshold.

Most photos score far from the decision threshold, and more views of them would not
change their verdict. A photo that scores within ``band`` of it is embedded again with
its view moved left, right, up and down (:func:`~.preprocess.moved_views`), and the latent
of all its views, first and moved, decides against a threshold calibrated for it. Five
times the encoder runs, paid by the few photos whose verdict they can change.

``auditlens calibrate --second-look SHIFT`` stores it in a bundle's decision::

    "second_look": {"photo_shift": 0.15, "band": 0.03, "threshold": 0.599,
                    "far_curve": [[score, far], ...], "measured_far": ..., "measured_tar": ...}

``threshold`` and ``far_curve`` are calibrated on the second look's scores (those of the
spec with that ``photo_shift``); ``measured_far`` and ``measured_tar`` are those of the
verdicts as a whole, first and second looks together.

The bundle's own ``threshold`` is calibrated on first scores alone, so a reader that does
not know the second look still gives verdicts within the target rate, only fewer matches:
the bundle keeps its format version.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from auditlens.device_app.preprocess import PreprocessSpec, check_shift

DEFAULT_BAND = 0.03
"""How near the threshold (in cosine) a first score takes a second look. Measured with the
shipped model on its validation photos (threshold chosen on half the products, verdicts
counted on the other half, 300 splits; docs/ablation.md, "A second look near the
threshold"): a 0.03 band keeps most of what the second look gains on every photo, for
about 3% of the pairs."""


@dataclass(frozen=True)
class SecondLook:
    """A bundle's second look: which views, for which first scores, against what."""

    photo_shift: float
    band: float
    threshold: float
    far_curve: np.ndarray | None = None
    """[[score, far], ...] of the second look's scores, as the first look's curve."""

    @classmethod
    def from_decision(cls, decision: dict, spec: PreprocessSpec) -> SecondLook | None:
        """The decision's second look (None without one). Raises ValueError when the
        spec cannot take it: it already has shifted views, or the shift leaves a box."""
        block = decision.get("second_look")
        if not block:
            return None
        check_shift(spec, block["photo_shift"])
        curve = block.get("far_curve")
        return cls(float(block["photo_shift"]), float(block["band"]), float(block["threshold"]),
                   np.asarray(curve, dtype=np.float64) if curve else None)

    def near(self, first, threshold: float):
        """Whether first scores (a number or an array) against ``threshold`` take a second look."""
        return np.abs(np.asarray(first, dtype=np.float64) - threshold) < self.band

    def decision_scores(self, first: np.ndarray, second: np.ndarray, threshold: float) -> np.ndarray:
        """Scores whose comparison with ``threshold`` gives the verdicts: a first score
        where no second look is taken, else the second score moved by the difference of
        the two thresholds. For ROC curves and calibration reports of the verdicts."""
        second = np.asarray(second, dtype=np.float64)
        return np.where(self.near(first, threshold), second - self.threshold + threshold,
                        np.asarray(first, dtype=np.float64))

