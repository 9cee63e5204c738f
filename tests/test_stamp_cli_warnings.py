"""stamp's command line shows a library warning as one line, like spavis's (issue 16: raw Python
warnings such as torch's UserWarning or PIL's DecompressionBombWarning leaked into CLI output)."""
from __future__ import annotations

import subprocess
import sys


def _run(code: str, **env) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def test_a_library_warning_after_the_cli_set_up_is_one_line():
    # setup_output() is what the stamp app's callback runs before every command
    code = ("from spavis.format.console import setup_output\nsetup_output()\n"
            "import torch\ntorch.tensor([1.0]).storage()\n"  # torch: TypedStorage is deprecated (UserWarning)
            "from PIL import Image\nImage.MAX_IMAGE_PIXELS = 40\n"
            "import io\nb = io.BytesIO(); Image.new('RGB', (8, 8)).save(b, 'PNG'); Image.open(b)\n")
    res = _run(code)
    assert res.returncode == 0, res.stderr
    lines = res.stderr.splitlines()
    bomb = [ln for ln in lines if "DecompressionBombWarning" in ln]
    assert len(bomb) == 1 and bomb[0].startswith("warning: ") and bomb[0].endswith("(DecompressionBombWarning from PIL)")
    assert all(ln.startswith("warning: ") for ln in lines), res.stderr  # no "file.py:12: UserWarning" + source line
    debug = _run(code, STAMP_DEBUG="1")  # debug mode: Python's own format, with the source location
    assert "DecompressionBombWarning:" in debug.stderr and ".py:" in debug.stderr


def test_huggingface_hub_log_records_print_once():
    """Issue 24: huggingface_hub's own stderr handler printed each of its retry warnings a second time."""
    code = ("from spavis.format.console import setup_output\nsetup_output()\n"
            "from huggingface_hub.utils import logging\n"
            "logging.get_logger('huggingface_hub.utils._http').warning('Retrying in 1s [Retry 1/5].')\n")
    res = _run(code)
    assert res.returncode == 0, res.stderr
    assert res.stderr.splitlines() == ["warning: Retrying in 1s [Retry 1/5]."], res.stderr
