"""A wheel of this checkout: what the ansible role installs on a node (tests/test_ansible.py's
sandbox, the simulated fleet of tests/test_fleet.py and bench/)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tts_testkit.paths import REPO


def build_wheel(out_dir: Path, timeout: float = 300) -> Path:
    """Built from a copy so the shared tree gets no build/ dir; the copy leaves out the
    tests, benchmarks and these dev tools, so the wheel holds the product only."""
    out_dir.mkdir(parents=True, exist_ok=True)
    src = out_dir / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", ".venv", "tests", "bench", "tts_testkit",
                                                             "demo-out", "ansible", "*.egg-info", "build", "dist",
                                                             "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(out_dir), str(src)], check=True, timeout=timeout, capture_output=True)
    return next(out_dir.glob("tts_fleet-*.whl"))
