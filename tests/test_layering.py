"""The package layering holds (import-linter's contracts in pyproject.toml), and the check
would see a break: a copy of the tree with one import pointing upwards must fail it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
PACKAGES = ("tts_common", "mirror", "provisioner", "runtime", "piper_import")

pytestmark = pytest.mark.integration


def lint(cwd: Path) -> subprocess.CompletedProcess:
    # --no-cache: a cache from another tree must not answer for this one
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_the_tree_keeps_every_layering_contract():
    result = lint(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize("module, bad_import, broken", [
    ("mirror/layout.py", "import runtime.engine", "mirror is not allowed to import runtime"),
    ("tts_common/atomic.py", "import mirror.manifest", "tts_common is not allowed to import mirror"),
    ("runtime/gate.py", "from provisioner.sync import Syncer", "runtime is not allowed to import provisioner.sync"),
])
def test_an_upward_import_breaks_a_contract(tmp_path, module, bad_import, broken):
    for package in PACKAGES:
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    with open(tmp_path / module, "a") as f:
        f.write(f"\n{bad_import}  # deliberately against the layering\n")
    result = lint(tmp_path)
    assert result.returncode == 1, result.stdout
    assert broken in result.stdout, result.stdout
