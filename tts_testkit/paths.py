"""Where things are: the checkout, the venv running this code, and where sandboxed
services and fleet nodes see that venv."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV = Path(sys.executable).parent.parent
VENV_BIN = VENV / "bin"
# Where sandboxed services and fleet nodes see the test venv (bind-mounted there, read-only).
SANDBOX_VENV = Path("/opt/tts-test-venv")
