"""Exceptions auditlens raises, one type per thing a field engineer can act on.

Every error carries a message that says what was wrong and what to do about it.
They all derive from :class:`AuditlensError`, so a service can catch one type.
"""

from __future__ import annotations


class AuditlensError(Exception):
    """Base class of every error auditlens raises on purpose."""


# -- images -------------------------------------------------------------------------
class ImageError(AuditlensError):
    """A photo or original could not be used."""


class UnreadableImageError(ImageError):
    """The bytes are not an image format auditlens can decode (or not an image at all)."""


class TruncatedImageError(ImageError):
    """The file ends before the image data does (interrupted upload or copy)."""


class ImageTooLargeError(ImageError):
    """The image declares more pixels than allowed (decompression-bomb guard)."""


class ImageTooSmallError(ImageError):
    """The image is too small to show a product (e.g. a 1x1 tracking pixel)."""


# -- bundles and models -------------------------------------------------------------
class BundleError(AuditlensError):
    """A reference bundle could not be loaded."""


class BundleFormatError(BundleError):
    """The bundle is malformed: a missing file, bad JSON, unknown format version, unsafe path."""


class BundleIntegrityError(BundleError):
    """A file of the bundle does not match the sha256 in its manifest (tampering or corruption)."""


class BundleSignatureError(BundleError):
    """The bundle is unsigned or its signature does not verify with the configured key."""


class ModelMismatchError(BundleError):
    """The model and the reference latents do not belong together."""


class ModelError(AuditlensError):
    """A model file could not be loaded or run."""


# -- catalogue and products ---------------------------------------------------------
class CatalogError(AuditlensError):
    """A product catalogue could not be read, or holds invalid entries."""


class UnknownProductError(AuditlensError, KeyError):
    """The product id is not in the reference bundle."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "unknown product"


# -- outputs ------------------------------------------------------------------------
class OutputPathError(AuditlensError):
    """An output path cannot take what would be written there (a folder where a file
    goes, a file where a folder goes); raised before any work."""


# -- audit log ----------------------------------------------------------------------
class AuditLogError(AuditlensError):
    """The audit log could not be written or read."""


class AuditRecordError(AuditLogError):
    """The log refuses this verdict and photo as a record (a field missing or not finite,
    a verdict that contradicts its threshold, a photo that is not the one judged): writing
    it again will not help, whatever the state of the log."""


class AuditLogKeyError(AuditLogError):
    """The log's records are signed and it was opened to append without the device key that
    signs them: the key must be installed; a new log would split the device's record."""


class AuditChainError(AuditLogError):
    """The audit log's hash chain is broken: a record was edited, removed or reordered."""


# -- training -----------------------------------------------------------------------
class TrainingDivergedError(AuditlensError):
    """Training stopped because its loss stopped being a number (a learning rate too high)."""
