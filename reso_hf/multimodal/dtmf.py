"""DTMF telephone tones (ITU-T Q.23 / Q.24), generated: the audio half of the multimodal task, no download.

A key of the 4x4 keypad is the sum of two sines, one from the low (row) group and one from the high (column)
group:

              1209 Hz  1336 Hz  1477 Hz  1633 Hz
    697 Hz       1        2        3        A
    770 Hz       4        5        6        B
    852 Hz       7        8        9        C
    941 Hz       *        0        #        D

`dtmf_tone` writes one key into a clip of silence and noise; `random_dtmf_clip` draws the nuisance parameters
that vary across the data set, within the tolerances receivers must accept (Q.24): each frequency off by up to
+-1.5 %, tone durations 40-400 ms (40 ms is the shortest valid tone), the high tone up to 4 dB louder or quieter than
the low one ("twist"), overall level -30 to -6 dBFS, white noise at 5-30 dB signal-to-noise ratio, a random start.
"""

from __future__ import annotations

import math

import numpy as np

ROW_FREQUENCIES = (697.0, 770.0, 852.0, 941.0)
COLUMN_FREQUENCIES = (1209.0, 1336.0, 1477.0, 1633.0)
KEYPAD = ("123A", "456B", "789C", "*0#D")
KEYS = tuple(key for row in KEYPAD for key in row)
DIGIT_KEYS = tuple("0123456789")
KEY_NAMES = {"*": "star", "#": "pound", **{key: key for key in KEYS if key not in "*#"}}
SAMPLING_RATE = 16000
CLIP_SECONDS = 1.0


def key_frequencies(key: str) -> tuple[float, float]:
    """(row, column) frequencies in Hz of keypad `key` ('0'-'9', '*', '#', 'A'-'D')."""
    for row, keys in enumerate(KEYPAD):
        if key in keys:
            return ROW_FREQUENCIES[row], COLUMN_FREQUENCIES[keys.index(key)]
    raise ValueError(f"key={key!r} is invalid: expected one of {''.join(KEYS)}")


def dtmf_tone(key: str, *, duration: float = 0.1, start: float = 0.0, level_db: float = -10.0,
              twist_db: float = 0.0, frequency_error: tuple[float, float] = (0.0, 0.0), snr_db: float | None = None,
              sampling_rate: int = SAMPLING_RATE, clip_seconds: float = CLIP_SECONDS,
              rng: np.random.Generator | None = None) -> np.ndarray:
    """A float32 clip of `clip_seconds` with `key`'s tone from `start` for `duration` seconds.

    level_db: RMS of the tone in dB relative to a full-scale sine; twist_db: high tone minus low tone level;
    frequency_error: relative offsets of the (row, column) frequencies; snr_db: white noise that many dB below the
    tone's power (None: no noise). Tone edges get 5 ms raised-cosine ramps so that no click spreads energy."""
    if duration <= 0 or start < 0 or start + duration > clip_seconds + 1e-9:
        raise ValueError(f"start={start} and duration={duration} must satisfy 0 <= start, 0 < duration, "
                         f"start + duration <= clip_seconds={clip_seconds}")
    rng = rng if rng is not None else np.random.default_rng(0)
    low, high = key_frequencies(key)
    low *= 1 + frequency_error[0]
    high *= 1 + frequency_error[1]
    clip = np.zeros(int(round(clip_seconds * sampling_rate)), dtype=np.float64)
    first, count = int(round(start * sampling_rate)), int(round(duration * sampling_rate))
    count = min(count, clip.shape[0] - first)
    t = np.arange(count) / sampling_rate
    high_gain = 10 ** (twist_db / 20)
    tone = (np.sin(2 * math.pi * low * t + rng.uniform(0, 2 * math.pi))
            + high_gain * np.sin(2 * math.pi * high * t + rng.uniform(0, 2 * math.pi)))
    ramp = min(int(0.005 * sampling_rate), count // 2)
    if ramp > 0:
        window = 0.5 - 0.5 * np.cos(np.linspace(0, math.pi, ramp))
        tone[:ramp] *= window
        tone[count - ramp:] *= window[::-1]
    # Scale so that the two-tone sum has the RMS of a sine at level_db dBFS.
    target_rms = 10 ** (level_db / 20) / math.sqrt(2)
    tone *= target_rms / math.sqrt((1 + high_gain**2) / 2)
    clip[first:first + count] = tone
    if snr_db is not None:
        noise_rms = target_rms / 10 ** (snr_db / 20)
        clip += rng.normal(0.0, noise_rms, clip.shape)
    return clip.astype(np.float32)


def random_dtmf_clip(key: str, rng: np.random.Generator, sampling_rate: int = SAMPLING_RATE,
                     clip_seconds: float = CLIP_SECONDS) -> np.ndarray:
    """`key`'s tone with duration, start, level, twist, frequency error and noise drawn as the module says."""
    duration = rng.uniform(0.04, 0.4)
    return dtmf_tone(
        key, duration=duration, start=rng.uniform(0.0, clip_seconds - duration), level_db=rng.uniform(-30.0, -6.0),
        twist_db=rng.uniform(-4.0, 4.0), frequency_error=tuple(rng.uniform(-0.015, 0.015, 2)),
        snr_db=rng.uniform(5.0, 30.0), sampling_rate=sampling_rate, clip_seconds=clip_seconds, rng=rng)


def dominant_frequencies(clip: np.ndarray, sampling_rate: int = SAMPLING_RATE, count: int = 2) -> list[float]:
    """The `count` strongest spectral peaks (Hz, ascending) of `clip`, one per 100 Hz neighbourhood."""
    spectrum = np.abs(np.fft.rfft(clip * np.hanning(clip.shape[0])))
    frequencies = np.fft.rfftfreq(clip.shape[0], 1 / sampling_rate)
    peaks = []
    for index in np.argsort(spectrum)[::-1]:
        if all(abs(frequencies[index] - peak) > 100 for peak in peaks):
            peaks.append(float(frequencies[index]))
        if len(peaks) == count:
            break
    return sorted(peaks)
