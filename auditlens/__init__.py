"""auditlens: does this field photo show the product in the catalogue?

The public API, importable from here::

    from auditlens import Verifier, ReferenceBundle, open_catalog, enroll
"""

from __future__ import annotations

import importlib
from pathlib import Path

__version__ = "0.1.0"


def _checkout_root() -> Path | None:
    """The repository root when this package is imported from a source checkout.

    An install maps the checkout's top-level ``training/``, ``export/``, ``device_app/``
    and ``models/`` folders under ``auditlens.`` (see pyproject.toml). Python started in
    the checkout finds this source folder before the installed package, so the checkout
    is made to resolve ``auditlens.device_app`` and the rest the same way.
    """
    root = Path(__file__).resolve().parent.parent
    try:
        pyproject = (root / "pyproject.toml").read_text(encoding="utf-8")
    except OSError:
        return None
    if 'name = "auditlens"' not in pyproject or not (root / "device_app" / "__init__.py").is_file():
        return None
    return root


_root = _checkout_root()
if _root is not None and str(_root) not in __path__:
    __path__.append(str(_root))
del _root

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
