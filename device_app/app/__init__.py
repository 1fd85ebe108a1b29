"""The Kivy field app (``auditlens app``): pick a product, capture, see the verdict,
keep the audit log. Kivy is imported by the screens only; ``session`` and ``camera``
hold the app's logic without it."""
