"""The README's Python example runs as written (from the repository root)."""

import contextlib
import io
import os
import re

from .conftest import REPO


def test_readme_python_example_runs():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "the README has no Python example"
    out = io.StringIO()
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        with contextlib.redirect_stdout(out):
            for block in blocks:
                exec(compile(block, "README.md", "exec"), {})
    finally:
        os.chdir(cwd)
    lines = out.getvalue().splitlines()
    assert lines[0].split()[0] in ("match", "no_match", "retake")
    assert lines[1].startswith("Banana ")  # the photo's own product ranks first
