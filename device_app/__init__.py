"""The on-device engine of auditlens: image loading, preprocessing, the LiteRT encoder,
reference bundles, scoring and the audit log.

Nothing in this package imports TensorFlow or Kivy (the Kivy UI lives in
``auditlens.device_app.app`` and is imported only by ``auditlens app``), so it runs on a
phone and in any Python service with numpy, Pillow and the LiteRT interpreter.
"""
