"""The importer's one error type."""

from tts_common.errors import TtsError


class PiperImportError(TtsError):
    """The ONNX/JSON pair is not a voice this importer understands (or cannot be read)."""
