"""The README's Python example runs as written (from the repository root)."""

import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

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
    assert lines[-1] == "[]"  # and the capture can be judged as it


def test_checkout_resolves_the_design_card_folders_under_auditlens():
    # Python started in a checkout finds its auditlens/ folder before any installed copy;
    # the top-level folders must then resolve as they do once installed. -S: no
    # site-packages, so nothing installed (or editable) can answer instead.
    code = (
        "import importlib.util as u, sys; sys.path[:] = [sys.argv[1]] + sys.path[1:]; "
        "print(*(u.find_spec(f'auditlens.{n}').origin for n in sys.argv[2:]))"
    )
    names = ["device_app.verifier", "training.model", "export.quantize", "models", "evaluation"]
    done = subprocess.run(
        [sys.executable, "-S", "-c", code, str(REPO), *names],
        capture_output=True, text=True, check=True, cwd=REPO.parent,
    )
    origins = [Path(p) for p in done.stdout.split()]
    expected = ["device_app/verifier.py", "training/model.py", "export/quantize.py",
                "models/__init__.py", "auditlens/evaluation/__init__.py"]
    assert origins == [REPO / e for e in expected]


def test_the_bench_quotes_the_readmes_held_out_figures():
    """The bench's note on products never seen in training quotes the README's fold table;
    the two must not drift apart when a model or its card changes."""
    from bench.__main__ import HELD_OUT

    text = (REPO / "README.md").read_text(encoding="utf-8")
    table = text[text.index("### Products never seen in training"):]
    rows = re.findall(r"^\| [123]/3 \| [^|]+\| ([\d.]+)% \| ([\d.]+)% \| [\d.]+% \| ([\d.]+)% \|", table, flags=re.M)
    assert len(rows) == 3, "the README's table of the three product folds was not found"
    quoted = [tuple(map(float, pair)) for pair in re.findall(r"([\d.]+)-([\d.]+)%", HELD_OUT)]
    for column, (low, high) in zip(zip(*rows), quoted, strict=True):
        assert (min(map(float, column)), max(map(float, column))) == (low, high)
    # ... and so does the README's own sentence under the side-by-side table
    (e_lo, e_hi), (t_lo, t_hi), (k_lo, k_hi) = quoted
    assert (f"EER {e_lo}% to {e_hi}%, TAR at FAR 1% {t_lo}% to {t_hi}% and top-1 {k_lo}% to {k_hi}%"
            in " ".join(text.split()))  # however the paragraph is wrapped
