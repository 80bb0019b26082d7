"""VITS inference in PyTorch, written for tts-fleet (no code taken from Piper or upstream VITS)."""

from .config import VitsConfig
from .model import VitsModel

__all__ = ["VitsConfig", "VitsModel"]
