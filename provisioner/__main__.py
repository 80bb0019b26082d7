"""`python -m provisioner` = `tts-provisioner` (the supervisor runs its own rollback this way)."""

from .cli import main

main(prog_name="tts-provisioner")
