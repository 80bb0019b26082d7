"""Encoding, resampling, volume and speed helpers."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf

from runtime.audio import (
    SUPPORTED_FORMATS,
    SUPPORTED_RATES,
    StreamResampler,
    UnsupportedFormatError,
    encode,
    resample,
)

pytestmark = pytest.mark.unit

RATE = 22050


def _tone(seconds=0.5, rate=RATE, amp=0.5):
    t = np.arange(int(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


def test_probe_lists_the_basics():
    assert {"wav", "flac", "pcm"} <= set(SUPPORTED_FORMATS)
    assert SUPPORTED_FORMATS["wav"] == "audio/wav"


@pytest.mark.parametrize("fmt", sorted(set(SUPPORTED_FORMATS) - {"pcm"}))
@pytest.mark.parametrize("target", [None, 16000, 48000])
def test_formats_round_trip(fmt, target):
    wave = _tone()
    data = encode(wave, RATE, fmt, target_rate=target)
    decoded, rate = sf.read(io.BytesIO(data), dtype="float32")
    want_rate = target or RATE
    if fmt == "opus" and want_rate not in (8000, 12000, 16000, 24000, 48000):
        want_rate = 24000  # opus only encodes at its own rates
    assert rate == want_rate
    expected = len(wave) * want_rate / RATE
    # lossy codecs add encoder delay/padding frames
    slack = 2 if fmt in ("wav", "flac") else 0.05 * expected + 2048
    assert abs(len(decoded) - expected) <= slack, (len(decoded), expected)
    if fmt in ("wav", "flac") and target is None:
        np.testing.assert_allclose(decoded, wave, atol=1.0 / 32767 + 1e-6)


def test_raw_pcm_is_s16le():
    wave = np.array([0.0, 0.5, -0.5, 1.0, -1.0], dtype=np.float32)
    data = encode(wave, RATE, "pcm")
    assert np.frombuffer(data, "<i2").tolist() == [0, 16384, -16384, 32767, -32767]


@pytest.mark.parametrize("rate", SUPPORTED_RATES)
def test_resample_lengths(rate):
    wave = _tone(1.0)
    out = resample(wave, RATE, rate)
    assert abs(len(out) - rate) <= 1
    assert out.dtype == np.float32


def test_volume_scales_and_clips():
    wave = _tone(amp=0.4)
    half = np.frombuffer(encode(wave, RATE, "pcm", volume=0.5), "<i2")
    full = np.frombuffer(encode(wave, RATE, "pcm"), "<i2")
    assert abs(int(np.abs(half).max()) * 2 - int(np.abs(full).max())) <= 2
    loud = np.frombuffer(encode(wave, RATE, "pcm", volume=10.0), "<i2")
    assert int(np.abs(loud).max()) == 32767
    with pytest.raises(ValueError, match="volume"):
        encode(wave, RATE, "wav", volume=-1)


def test_bad_input_raises():
    with pytest.raises(UnsupportedFormatError, match="'aiff'"):
        encode(_tone(), RATE, "aiff")
    with pytest.raises(ValueError, match="sample rate 11025"):
        encode(_tone(), RATE, "wav", target_rate=11025)
    with pytest.raises(ValueError, match="mono"):
        encode(np.zeros((2, 10), dtype=np.float32), RATE, "wav")
    with pytest.raises(ValueError, match="NaN"):
        encode(np.array([np.nan], dtype=np.float32), RATE, "wav")
    with pytest.raises(ValueError, match="float"):
        encode(np.zeros(10, dtype=np.int16), RATE, "wav")


def test_stream_resampler_pieces_join_into_the_whole():
    rng = np.random.default_rng(3)
    wave = (rng.standard_normal(22050 * 2) * 0.2).astype(np.float32)
    for target in (8000, 16000, 48000):
        rs = StreamResampler(22050, target)
        cuts = [0, 11008, 11009, 30000, len(wave)]
        pieces = [rs(wave[a:b], last=(b == len(wave))) for a, b in zip(cuts, cuts[1:])]
        joined = np.concatenate(pieces)
        whole = resample(wave, 22050, target)
        assert joined.shape == whole.shape, target
        assert float(np.abs(joined - whole).max()) <= 1e-6, target
    assert np.array_equal(StreamResampler(22050, 22050)(wave[:100]), wave[:100])
    with pytest.raises(ValueError, match="unsupported sample rate 12345"):
        StreamResampler(22050, 12345)
