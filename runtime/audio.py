"""Waveform post-processing and encoding: volume, resampling (soxr), container/codec encoding.

Speed is not a post-process: the model places its frames 1/speed apart (VitsModel._prior),
so pitch and timbre stay natural.

Formats are probed against the installed libsndfile at import time; SUPPORTED_FORMATS only
lists what actually encodes here.
"""

from __future__ import annotations

import io

import numpy as np
import soundfile as sf
import soxr
import structlog

from tts_common.errors import TtsError

log = structlog.get_logger(__name__)

SUPPORTED_RATES: tuple[int, ...] = (8000, 16000, 22050, 24000, 44100, 48000)
OPUS_RATES: tuple[int, ...] = (8000, 12000, 16000, 24000, 48000)
MAX_VOLUME = 10.0

# format -> (libsndfile container, subtype, mime); "pcm" is raw s16le and needs no libsndfile
_CANDIDATES: dict[str, tuple[str, str, str]] = {
    "wav": ("WAV", "PCM_16", "audio/wav"),
    "flac": ("FLAC", "PCM_16", "audio/flac"),
    "opus": ("OGG", "OPUS", "audio/ogg; codecs=opus"),
    "ogg": ("OGG", "VORBIS", "audio/ogg; codecs=vorbis"),
    "mp3": ("MP3", "MPEG_LAYER_III", "audio/mpeg"),
}


class UnsupportedFormatError(TtsError, ValueError):
    """Requested output format is unknown or not supported by this libsndfile."""


def _probe() -> dict[str, str]:
    formats = {}
    probe = np.zeros(2400, dtype=np.float32)
    for name, (container, subtype, mime) in _CANDIDATES.items():
        rate = 24000 if subtype == "OPUS" else 22050
        try:
            buf = io.BytesIO()
            sf.write(buf, probe, rate, format=container, subtype=subtype)
            if buf.tell() == 0:
                raise RuntimeError("wrote nothing")
            formats[name] = mime
        except Exception as exc:  # libsndfile built without this codec
            log.debug("audio.format_unavailable", format=name, error=str(exc))
    formats["pcm"] = "audio/pcm"  # raw signed 16-bit little-endian mono
    return formats


SUPPORTED_FORMATS: dict[str, str] = _probe()


def _as_mono_float(wave: np.ndarray) -> np.ndarray:
    arr = np.asarray(wave)
    if arr.ndim == 2 and 1 in arr.shape:
        arr = arr.reshape(-1)
    if arr.ndim != 1:
        raise ValueError(f"expected a mono waveform (1-D), got shape {arr.shape}")
    if arr.dtype.kind != "f":
        raise ValueError(f"expected a float waveform, got dtype {arr.dtype}")
    arr = arr.astype(np.float32, copy=False)
    if not np.all(np.isfinite(arr)):
        raise ValueError("waveform contains NaN or infinite samples")
    return arr


def resample(wave: np.ndarray, sample_rate: int, target_rate: int) -> np.ndarray:
    """High-quality soxr resampling; output length is round(len * target / source)."""
    if target_rate not in SUPPORTED_RATES:
        raise ValueError(f"unsupported sample rate {target_rate}; choose one of {list(SUPPORTED_RATES)}")
    wave = _as_mono_float(wave)
    if target_rate == sample_rate or wave.size == 0:
        return wave
    return soxr.resample(wave, sample_rate, target_rate, quality="HQ").astype(np.float32, copy=False)


class StreamResampler:
    """Resamples a stream piece by piece through one soxr state, so the pieces join into exactly
    what resampling the whole would give (resampled one by one they would click where they
    meet). The identity when the rates are equal."""

    def __init__(self, sample_rate: int, target_rate: int):
        if target_rate not in SUPPORTED_RATES:
            raise ValueError(f"unsupported sample rate {target_rate}; choose one of {list(SUPPORTED_RATES)}")
        self._stream = (None if target_rate == sample_rate
                        else soxr.ResampleStream(sample_rate, target_rate, 1, dtype="float32", quality="HQ"))

    def __call__(self, piece: np.ndarray, last: bool = False) -> np.ndarray:
        """The next piece; `last` flushes what the filter still holds."""
        piece = _as_mono_float(piece)
        if self._stream is None:
            return piece
        return self._stream.resample_chunk(piece, last=last).astype(np.float32, copy=False)


def output_rate(fmt: str, rate: int) -> int:
    """The sample rate `fmt` carries for audio at `rate`: Opus only encodes at 8/12/16/24/48
    kHz, so other rates go to the next supported rate up (22050 -> 24000)."""
    if fmt.lower() == "opus" and rate not in OPUS_RATES:
        return next((r for r in OPUS_RATES if r >= rate), OPUS_RATES[-1])
    return rate


def _prepare(wave: np.ndarray, rate: int, fmt: str, volume: float) -> tuple[np.ndarray, int]:
    """Volume, clipping and Opus's rate (see output_rate)."""
    if not (0.0 <= float(volume) <= MAX_VOLUME):
        raise ValueError(f"volume must be between 0 and {MAX_VOLUME}, got {volume}")
    wave = _as_mono_float(wave)
    out = output_rate(fmt, rate)
    if out != rate:
        wave = soxr.resample(wave, rate, out, quality="HQ").astype(np.float32, copy=False)
    if volume != 1.0:
        wave = wave * np.float32(volume)
    return np.clip(wave, -1.0, 1.0), out


class _AppendOnly(io.RawIOBase):
    """A write-only sink for libsndfile that hands out what was written since the last
    take(). Writes at an earlier position (a header rewrite at close) are dropped: those
    bytes have left already."""

    def __init__(self) -> None:
        self._sent = 0
        self._new = bytearray()
        self._pos = 0

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def write(self, data) -> int:
        data = bytes(data)
        if self._pos == self._sent + len(self._new):
            self._new += data
        self._pos += len(data)
        return len(data)

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        end = self._sent + len(self._new)
        self._pos = offset if whence == io.SEEK_SET else (self._pos + offset if whence == io.SEEK_CUR else end + offset)
        return self._pos

    def take(self) -> bytes:
        out = bytes(self._new)
        self._sent += len(out)
        self._new.clear()
        return out


class StreamEncoder:
    """One encoder run fed piece by piece: the pieces' bytes join into one valid stream with
    no gap where pieces meet, and a decoder reads it to its end. Ogg Opus and Vorbis go through
    libsndfile, whose Ogg bytes never need rewriting at the end. MP3 goes through LAME
    (`lameenc`) at a constant bit rate and without the Xing/LAME info frame: libsndfile writes
    that frame first and rewrites it at close with the length, which a stream cannot take back
    (decoders then stop after the first piece), and a stream's length is not known when it
    starts. Without it a decoder plays the whole stream, plus the encoder's delay (576 samples)
    at the start and the last frame's padding at the end (see MP3_STREAM_EXTRA)."""

    def __init__(self, fmt: str, sample_rate: int, volume: float = 1.0):
        fmt = fmt.lower()
        if fmt not in STREAM_ENCODED or fmt not in SUPPORTED_FORMATS:
            raise UnsupportedFormatError(f"format {fmt!r} cannot be encoded as one stream here")
        self.fmt, self.volume, self.in_rate = fmt, volume, int(sample_rate)
        self.rate = output_rate(fmt, self.in_rate)
        self._resampler = StreamResampler(self.in_rate, self.rate) if self.rate != self.in_rate else None
        if fmt == "mp3":
            self._lame = _lame_encoder(self.rate)
            self._file = self._sink = None
        else:
            container, subtype, _ = _CANDIDATES[fmt]
            self._lame = None
            self._sink = _AppendOnly()
            self._file = sf.SoundFile(self._sink, "w", self.rate, 1, format=container, subtype=subtype)

    def __call__(self, piece: np.ndarray, last: bool = False) -> bytes:
        """Encode the next piece; `last` finishes the stream. Returns the bytes ready to send."""
        wave = _as_mono_float(piece)
        if self._resampler is not None:
            wave = self._resampler(wave, last)
        wave, _ = _prepare(wave, self.rate, self.fmt, self.volume)
        if self._lame is not None:
            out = bytes(self._lame.encode(_s16le(wave))) if wave.size else b""
            return out + (bytes(self._lame.flush()) if last else b"")
        if wave.size:
            self._file.write(wave)
        if last:
            self._file.close()
        return self._sink.take()


# MP3 bit rates (kbit/s, constant) by sample rate, mono speech: MPEG-2.5 (8 kHz), MPEG-2 (16-24
# kHz) and MPEG-1 (44.1/48 kHz) frames; each keeps its rate (LAME resamples only when told).
MP3_KBPS = {8000: 32, 11025: 32, 12000: 32, 16000: 48, 22050: 64, 24000: 64, 32000: 96, 44100: 96, 48000: 96}
# What a streamed MP3 decodes to beyond its audio, at most, in samples: LAME's delay (576) plus the
# decoder's (529) at the start, the last frame's padding and LAME's closing frame at the end.
# Measured 1155-1857 at 8-24 kHz, 1161-2345 at 44.1/48 kHz (libsndfile and ffmpeg alike).
MP3_STREAM_EXTRA = 576 + 529 + 2 * 1152


def _lame_encoder(rate: int):
    import lameenc  # imported when an MP3 stream first needs it

    enc = lameenc.Encoder()
    enc.set_channels(1)
    enc.set_in_sample_rate(rate)
    enc.set_out_sample_rate(rate)
    enc.set_bit_rate(MP3_KBPS.get(rate, 64))
    enc.set_quality(2)  # LAME's "high quality" (0 best/slowest .. 9): ~2% of a sentence's synthesis time
    return enc


def _s16le(wave: np.ndarray) -> bytes:
    return (wave * 32767.0).round().astype("<i2").tobytes()


STREAM_ENCODED = frozenset({"opus", "ogg", "mp3"})


def encode(wave: np.ndarray, sample_rate: int, fmt: str, target_rate: int | None = None, volume: float = 1.0) -> bytes:
    """Float waveform in [-1, 1] -> encoded bytes in `fmt` (see SUPPORTED_FORMATS).

    volume is a linear gain (0..10) applied before clipping to [-1, 1]. target_rate resamples
    first. Opus only encodes at 8/12/16/24/48 kHz: other rates go to the next supported rate up.
    """
    fmt = fmt.lower()
    if fmt not in SUPPORTED_FORMATS:
        raise UnsupportedFormatError(f"unsupported format {fmt!r}; supported: {sorted(SUPPORTED_FORMATS)}")
    if not (0.0 <= float(volume) <= MAX_VOLUME):
        raise ValueError(f"volume must be between 0 and {MAX_VOLUME}, got {volume}")
    if int(sample_rate) <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    wave = _as_mono_float(wave)
    rate = int(sample_rate)
    if target_rate is not None and int(target_rate) != rate:
        wave, rate = resample(wave, rate, int(target_rate)), int(target_rate)
    wave, rate = _prepare(wave, rate, fmt, volume)

    if fmt == "pcm":
        return _s16le(wave)
    container, subtype, _ = _CANDIDATES[fmt]
    buf = io.BytesIO()
    sf.write(buf, wave, rate, format=container, subtype=subtype)
    return buf.getvalue()
