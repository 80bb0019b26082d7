"""Is this audio plausibly speech for this text? The rollout's health gate (`tts-ctl check`)
asks it, because "a WAV came back" also holds for a model that was signed and published by
mistake and speaks silence or noise.

Checks, each cheap and independent of the voice:
- duration plausible for the text (between MIN_S_PER_CHAR and MAX_S_PER_CHAR seconds per
  letter or digit, plus a little slack);
- not silent (RMS above SILENCE_DBFS);
- not clipped (at most MAX_CLIPPED of the samples at full scale);
- energy in the speech band (SPEECH_BAND Hz holds at least MIN_SPEECH_BAND of the power
  above 20 Hz; white noise at 22.05 kHz puts ~36% there, speech over 80%);
- not noise-like (spectral flatness of the average spectrum at most MAX_FLATNESS; white
  noise is near 1, voiced speech well under 0.1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

MIN_S_PER_CHAR = 0.02
MAX_S_PER_CHAR = 0.25
SLACK_S = 1.0
SILENCE_DBFS = -45.0
MAX_CLIPPED = 0.01
SPEECH_BAND = (80.0, 4000.0)
MIN_SPEECH_BAND = 0.6
MAX_FLATNESS = 0.3


@dataclass
class SpeechVerdict:
    ok: bool
    reason: str
    figures: dict[str, float] = field(default_factory=dict)

    def line(self) -> str:
        f = self.figures
        summary = (f"{f.get('duration_s', 0):.2f} s, rms {f.get('rms_dbfs', -math.inf):.0f} dBFS, "
                   f"clipped {100 * f.get('clipped', 0):.1f}%, speech band {100 * f.get('speech_band', 0):.0f}%, "
                   f"flatness {f.get('flatness', 0):.2f}")
        return f"{'ok' if self.ok else 'not speech: ' + self.reason} ({summary})"


def _letters(text: str) -> int:
    return sum(1 for c in text if c.isalnum())


def check_speech(wave: np.ndarray, sample_rate: int, text: str) -> SpeechVerdict:
    wave = np.asarray(wave, dtype=np.float64).reshape(-1)
    chars = max(1, _letters(text))
    duration = len(wave) / float(sample_rate)
    figures: dict[str, float] = {"duration_s": duration}
    if len(wave) == 0:
        return SpeechVerdict(False, "no samples", figures)
    rms = float(np.sqrt(np.mean(wave ** 2)))
    figures["rms_dbfs"] = 20 * math.log10(rms) if rms > 0 else -math.inf
    figures["clipped"] = float(np.mean(np.abs(wave) >= 0.99))
    # Average power spectrum over 2048-sample frames (Hann window).
    n = 2048
    frames = [wave[i:i + n] for i in range(0, max(1, len(wave) - n + 1), n // 2)]
    frames = [np.pad(f, (0, n - len(f))) for f in frames]
    power = np.mean([np.abs(np.fft.rfft(f * np.hanning(n))) ** 2 for f in frames], axis=0)
    freqs = np.fft.rfftfreq(n, 1.0 / sample_rate)
    audible = power[freqs >= 20.0]
    total = float(audible.sum())
    band = float(power[(freqs >= SPEECH_BAND[0]) & (freqs <= SPEECH_BAND[1])].sum())
    figures["speech_band"] = band / total if total > 0 else 0.0
    positive = audible[audible > 0]
    figures["flatness"] = float(np.exp(np.mean(np.log(positive))) / np.mean(positive)) if len(positive) else 0.0

    low, high = MIN_S_PER_CHAR * chars, MAX_S_PER_CHAR * chars + SLACK_S
    if not low <= duration <= high:
        return SpeechVerdict(False, f"duration {duration:.2f} s implausible for {chars} letters "
                                    f"(expected {low:.2f}-{high:.2f} s)", figures)
    if figures["rms_dbfs"] < SILENCE_DBFS:
        return SpeechVerdict(False, f"silent (rms {figures['rms_dbfs']:.0f} dBFS < {SILENCE_DBFS:.0f})", figures)
    if figures["clipped"] > MAX_CLIPPED:
        return SpeechVerdict(False, f"clipped ({100 * figures['clipped']:.1f}% of samples at full scale)", figures)
    if figures["speech_band"] < MIN_SPEECH_BAND:
        return SpeechVerdict(False, f"little energy in the speech band ({100 * figures['speech_band']:.0f}% in "
                                    f"{SPEECH_BAND[0]:.0f}-{SPEECH_BAND[1]:.0f} Hz)", figures)
    if figures["flatness"] > MAX_FLATNESS:
        return SpeechVerdict(False, f"noise-like spectrum (flatness {figures['flatness']:.2f})", figures)
    return SpeechVerdict(True, "", figures)
