"""auditlens: does this field photo show the product in the catalogue?

The public API, importable from here::

    from auditlens import Verifier, ReferenceBundle, open_catalog, enroll
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Verifier": "auditlens.device_app.verifier",
    "VerifierOptions": "auditlens.device_app.verifier",
    "Verdict": "auditlens.device_app.verifier",
    "ReferenceBundle": "auditlens.device_app.bundle",
    "Encoder": "auditlens.device_app.interpreter",
    "PreprocessSpec": "auditlens.device_app.preprocess",
    "load_image": "auditlens.device_app.imaging",
    "open_catalog": "auditlens.catalog",
    "read_labelled_photos": "auditlens.catalog",
    "enroll": "auditlens.export.enroll",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    # imported on first use, so `auditlens --help` and `import auditlens` stay instant
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'auditlens' has no attribute {name!r}")
