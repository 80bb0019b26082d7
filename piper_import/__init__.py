"""Importing Piper voices into tts-fleet's voice bundle (`tts-mirror import-piper`).

A package of its own, above the runtime: it writes the bundle the engine reads
(runtime/bundle.py) and checks the converted weights against the runtime's VITS module.
`tts-mirror` reaches it through an entry point (`tts_fleet.mirror_commands`), never by
an import, so the mirror layer stays below the runtime. Needs the `import` extra (onnx).
"""

from .errors import PiperImportError
from .importer import ImportReport, bundled_voice_paths, import_piper

__all__ = ["ImportReport", "PiperImportError", "bundled_voice_paths", "import_piper"]
