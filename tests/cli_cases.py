"""Several invocations of the real ``stamp`` command line in ONE subprocess (one torch import, ~4 s, instead of
one per case). Each case runs the typer app as the console script does (``app(args)``: the same option
parsing, error wrapper and exit codes) with its own stdout / stderr, environment and working folder; an
exception that escapes prints its traceback into that case's stderr, as Python would.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

_DRIVER = r"""
import io, json, os, sys, traceback

cases = json.loads(sys.stdin.read())
real_stdout = sys.stdout
current = {}


class Stream(io.TextIOBase):
    # one object per stream for the whole run, writing into the running case's buffer: a log handler
    # made during the first case still writes into the last case's stderr
    def __init__(self, name):
        self.name = name

    def write(self, s):
        return current[self.name].write(s)

    def isatty(self):
        return False


sys.stdout, sys.stderr = Stream("stdout"), Stream("stderr")
current.update(stdout=io.StringIO(), stderr=io.StringIO())
from stamp.cli import app

results = []
for case in cases:
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    current.update(stdout=io.StringIO(), stderr=io.StringIO())
    os.environ.update(case["env"])
    os.chdir(case["cwd"])
    code = 0
    try:
        app(case["args"], prog_name="stamp")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # what the console script would print as a traceback
        code = 1
        current["stderr"].write(traceback.format_exc())
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    results.append({"code": code, "stdout": current["stdout"].getvalue(), "stderr": current["stderr"].getvalue()})
real_stdout.write(json.dumps(results))
"""


@dataclass
class Case:
    """One command line: ``args`` after ``stamp``; ``env`` added for it; ``cwd`` its working folder."""

    args: list[str]
    env: dict[str, str] | None = None
    cwd: Path | None = None


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    def error_lines(self) -> list[str]:
        return [ln for ln in self.stderr.splitlines() if ln.strip() and not ln.startswith("warning")]

    def one_line_error(self) -> str:
        """Exit 1, no traceback, and a single ``error:`` line (a long line may wrap: joined)."""
        assert self.code == 1, (self.code, self.stderr[-3000:])
        assert "Traceback" not in self.stderr, self.stderr[-3000:]
        lines = self.error_lines()
        assert lines and lines[0].startswith("error:") and len(self.stderr.splitlines()) <= 4, self.stderr
        return " ".join(ln.strip() for ln in lines)


def run_cases(*cases: Case, env: dict[str, str] | None = None, timeout: int = 300) -> list[Result]:
    """Run ``cases`` in one ``python`` subprocess (``env``: for all of them; offline Hub by default)."""
    base = {**os.environ, "COLUMNS": "250", "HF_HUB_OFFLINE": "1", **(env or {})}
    for key in ("STAMP_DEBUG", "SPAVIS_DEBUG"):
        base.pop(key, None)
    payload = [{"args": [str(a) for a in c.args], "env": {k: str(v) for k, v in (c.env or {}).items()},
                "cwd": str(c.cwd or os.getcwd())} for c in cases]
    res = subprocess.run([sys.executable, "-c", _DRIVER], input=json.dumps(payload), env=base, capture_output=True,
                         text=True, timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    return [Result(**r) for r in json.loads(res.stdout)]
