"""runtime/speechcheck.py, the audio half of the rollout's health gate: the real voice passes,
and each kind of garbage a mis-published model could speak is caught with its own reason."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.speechcheck import check_speech

pytestmark = pytest.mark.unit

SR = 22050
TEXT = "Health check."


@pytest.fixture(scope="module")
def speech(engine):
    return engine.synthesize_text(TEXT), engine.sample_rate


def test_real_voice_passes(speech):
    wave, rate = speech
    verdict = check_speech(wave, rate, TEXT)
    assert verdict.ok, verdict.line()
    assert verdict.line().startswith("ok (")


def test_silence_fails(speech):
    wave, rate = speech
    verdict = check_speech(np.zeros_like(wave), rate, TEXT)
    assert not verdict.ok and "silent" in verdict.reason


def test_white_noise_fails(speech):
    wave, rate = speech
    noise = np.random.default_rng(1).normal(0, 0.1, len(wave)).astype(np.float32)
    verdict = check_speech(noise, rate, TEXT)
    assert not verdict.ok and ("speech band" in verdict.reason or "noise-like" in verdict.reason), verdict.line()


def test_clipped_fails(speech):
    wave, rate = speech
    verdict = check_speech(np.clip(wave * 50, -1, 1), rate, TEXT)
    assert not verdict.ok and "clipped" in verdict.reason, verdict.line()


def test_high_tone_fails(speech):
    wave, rate = speech
    tone = 0.3 * np.sin(2 * np.pi * 9000 * np.arange(len(wave)) / rate)
    verdict = check_speech(tone, rate, TEXT)
    assert not verdict.ok and "speech band" in verdict.reason, verdict.line()


@pytest.mark.parametrize("seconds", [0.05, 30.0])
def test_implausible_duration_fails(speech, seconds):
    wave, rate = speech
    n = int(seconds * rate)
    resized = np.resize(wave, n)
    verdict = check_speech(resized, rate, TEXT)
    assert not verdict.ok and "duration" in verdict.reason, verdict.line()


def test_empty_fails():
    verdict = check_speech(np.zeros(0, dtype=np.float32), SR, TEXT)
    assert not verdict.ok and verdict.reason == "no samples"
