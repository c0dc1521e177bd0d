"""The built-in offline dataset: handwritten digits as captions, images, videos and spoken words.

Everything is made locally, nothing is downloaded:

- images: scikit-learn's bundled `load_digits` (1797 greyscale 8x8 digits, values 0..16, shipped inside
  the sklearn wheel), scaled to [0, 1] and upsampled bilinearly to 16x16;
- videos: the same digit, resized to 12x12, sliding 4 pixels across a 16x16 canvas over 4 frames in a
  direction (left/right/up/down) drawn per item; the direction is not in the caption, so a video is
  labelled by its digit only;
- audio: the digit's name spoken by `espeak-ng` (a system package) with a voice, speed and pitch drawn
  per item, resampled to 16 kHz and padded/cropped to 1 s; files are cached in a directory. Without
  espeak-ng the audio modality is reported unavailable (`audio_status()` says why), never faked;
- captions: one of four templates per item ("a handwritten seven", "the digit seven", ...);
  `CLASS_CAPTIONS` (template 0) are the prompts for zero-shot classification.

Splits are deterministic: a seeded permutation of the 1797 indices, 70% train, 10% calibration (fits the
`CrossModalCalibration`), 20% test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ds_multimodal.errors import DsMultimodalError

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = ("the digit {}", "a handwritten {}", "a picture of the number {}", "{} written by hand")
CLASS_CAPTIONS = tuple(TEMPLATES[0].format(w) for w in DIGIT_WORDS)
IMAGE_SIZE = 16
NUM_FRAMES = 4
SAMPLE_RATE = 16_000
AUDIO_SECONDS = 1.0
DIRECTIONS = ("left", "right", "up", "down")
# Voice x speed (words/min) x pitch grid for espeak-ng: 4 * 3 * 3 = 36 renditions of each word.
VOICES = ("en", "en-us", "en-gb-scotland", "en-gb-x-rp")
SPEEDS = (130, 160, 190)
PITCHES = (30, 50, 70)
SPLIT_FRACTIONS = {"train": 0.7, "calibration": 0.1, "test": 0.2}


def default_cache_dir() -> Path:
    return Path(os.environ.get("DS_MULTIMODAL_CACHE", Path.home() / ".cache" / "ds-multimodal"))


def audio_status() -> tuple[bool, str]:
    """(available, reason): whether spoken digits can be synthesised here."""
    if shutil.which("espeak-ng") is None:
        return False, "espeak-ng not found on PATH (Debian/Ubuntu: apt-get install -y espeak-ng)"
    return True, "espeak-ng found"


@dataclass
class DigitsDataset:
    """One split: parallel tensors, item i of every modality shows digit labels[i]."""

    captions: list[str]
    labels: torch.Tensor  # (N,) long, the digit
    images: torch.Tensor  # (N, 1, 16, 16) float in [0, 1]
    videos: torch.Tensor  # (N, 4, 1, 16, 16)
    audio: torch.Tensor | None  # (N, 16000) float waveform at 16 kHz, None when unavailable
    audio_reason: str

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> dict:
        """Item i as a dict (a map-style dataset for ds-trainer): caption, label, image, video, audio."""
        return {
            "caption": self.captions[i],
            "label": int(self.labels[i]),
            "image": self.images[i],
            "video": self.videos[i],
            "audio": None if self.audio is None else self.audio[i],
        }

    def subset(self, idx: torch.Tensor | list[int]) -> DigitsDataset:
        idx = torch.as_tensor(idx, dtype=torch.long)
        return DigitsDataset(
            captions=[self.captions[i] for i in idx.tolist()],
            labels=self.labels[idx],
            images=self.images[idx],
            videos=self.videos[idx],
            audio=None if self.audio is None else self.audio[idx],
            audio_reason=self.audio_reason,
        )


def _split_indices(n: int, seed: int) -> dict[str, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    n_train = round(n * SPLIT_FRACTIONS["train"])
    n_cal = round(n * SPLIT_FRACTIONS["calibration"])
    return {
        "train": perm[:n_train],
        "calibration": perm[n_train : n_train + n_cal],
        "test": perm[n_train + n_cal :],
    }


def make_video(digit8: torch.Tensor, direction: str) -> torch.Tensor:
    """(8, 8) digit in [0, 1] -> (NUM_FRAMES, 1, 16, 16): a 12x12 copy sliding 4 px in `direction`."""
    glyph = F.interpolate(digit8[None, None], size=(12, 12), mode="bilinear", align_corners=False)[0, 0]
    travel = IMAGE_SIZE - 12
    frames = torch.zeros(NUM_FRAMES, 1, IMAGE_SIZE, IMAGE_SIZE)
    for t in range(NUM_FRAMES):
        step = round(t * travel / (NUM_FRAMES - 1))
        x = y = travel // 2
        if direction == "left":
            x = travel - step
        elif direction == "right":
            x = step
        elif direction == "up":
            y = travel - step
        else:
            y = step
        frames[t, 0, y : y + 12, x : x + 12] = glyph
    return frames


def _read_wav(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path), "rb") as w:
        rate, n, width = w.getframerate(), w.getnframes(), w.getsampwidth()
        raw = w.readframes(n)
    if width != 2:
        raise DsMultimodalError(f"{path}: expected 16-bit PCM, got {8 * width}-bit")
    return np.frombuffer(raw, dtype=np.int16).astype(np.float32) / 32768.0, rate


def speak(word: str, voice: str, speed: int, pitch: int, cache_dir: Path) -> np.ndarray:
    """The word spoken by espeak-ng at 16 kHz, 1 s (cached as a .npy under cache_dir/audio)."""
    from scipy.signal import resample_poly

    out = cache_dir / "audio" / f"{word}-{voice}-{speed}-{pitch}.npy"
    if out.exists():
        return np.load(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        wav = Path(tmp) / "x.wav"
        cmd = ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(wav), word]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not wav.exists():
            raise DsMultimodalError(f"espeak-ng: failed for {word!r} voice {voice}: {proc.stderr.strip()}")
        x, rate = _read_wav(wav)
    g = np.gcd(SAMPLE_RATE, rate)
    x = resample_poly(x, SAMPLE_RATE // g, rate // g).astype(np.float32)
    n = int(SAMPLE_RATE * AUDIO_SECONDS)
    x = np.pad(x, (0, max(0, n - len(x))))[:n]
    tmp_npy = out.with_suffix(".tmp.npy")
    np.save(tmp_npy, x)
    os.replace(tmp_npy, out)
    return x


def load_digits_multimodal(
    split: str = "train",
    *,
    seed: int = 0,
    audio: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
    limit: int = 0,
) -> DigitsDataset:
    """One split ("train" | "calibration" | "test") of the built-in dataset, deterministic in `seed`.

    limit > 0 keeps only the split's first `limit` items (quick runs and tests).
    """
    if split not in SPLIT_FRACTIONS:
        raise DsMultimodalError(f"split: expected one of {', '.join(SPLIT_FRACTIONS)}, got {split!r}")
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DsMultimodalError(
            "dataset: the built-in dataset needs scikit-learn (pip install 'ds-multimodal[data]')"
        ) from None
    digits = load_digits()
    idx = _split_indices(len(digits.target), seed)[split]
    if limit:
        idx = idx[:limit]
    rng = np.random.default_rng(seed + 1)  # per-item choices for all 1797 items, so splits agree
    n_all = len(digits.target)
    template = rng.integers(len(TEMPLATES), size=n_all)
    direction = rng.integers(len(DIRECTIONS), size=n_all)
    voice = rng.integers(len(VOICES), size=n_all)
    speed = rng.integers(len(SPEEDS), size=n_all)
    pitch = rng.integers(len(PITCHES), size=n_all)

    labels = torch.as_tensor(digits.target[idx], dtype=torch.long)
    small = torch.as_tensor(digits.images[idx], dtype=torch.float32) / 16.0  # (N, 8, 8)
    images = F.interpolate(
        small[:, None], size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False
    )
    videos = torch.stack([make_video(small[j], DIRECTIONS[direction[i]]) for j, i in enumerate(idx)])
    captions = [TEMPLATES[template[i]].format(DIGIT_WORDS[digits.target[i]]) for i in idx]

    waves, reason = None, "audio not requested"
    if audio:
        available, reason = audio_status()
        if available:
            cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
            waves = torch.as_tensor(
                np.stack(
                    [
                        speak(
                            DIGIT_WORDS[digits.target[i]],
                            VOICES[voice[i]],
                            SPEEDS[speed[i]],
                            PITCHES[pitch[i]],
                            cache,
                        )
                        for i in idx
                    ]
                )
            )
    return DigitsDataset(captions, labels, images.clamp(0, 1), videos, waves, reason)
