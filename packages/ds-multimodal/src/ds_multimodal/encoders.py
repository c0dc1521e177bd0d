"""Encoders for text, image, video and audio, each ending in a projection head into one space.

Every encoder returns `(embedding, tokens, mask)`:
  embedding (B, E) L2-normalised — what retrieval compares;
  tokens    (B, N, E) the per-token states passed through the same projection — what
            `CrossModalCalibration` attends over;
  mask      (B, N) bool, True where a token is real (only text pads).
Each encoder takes an optional pretrained `backbone` module in place of the one it builds; the
backbone must map the encoder's input to hidden states of width `hidden_dim` as documented per class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ds_models import ModelConfig, Transformer
from ds_multimodal.data import IMAGE_SIZE, SAMPLE_RATE
from ds_multimodal.errors import DsMultimodalError

PAD_ID = 0  # byte vocabulary: ids 1..256 are bytes 0..255 shifted by one, 0 pads


@dataclass
class EncoderConfig:
    """Sizes shared by the four encoders (small enough to train on a CPU in minutes)."""

    embed_dim: int = 64  # the shared space
    hidden_dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    patch_size: int = 4
    max_text_len: int = 48
    n_mels: int = 40
    n_fft: int = 400  # 25 ms at 16 kHz
    hop_length: int = 160  # 10 ms
    mel_frames_per_token: int = 4

    def __post_init__(self) -> None:
        for name in (
            "embed_dim",
            "hidden_dim",
            "n_layers",
            "n_heads",
            "patch_size",
            "max_text_len",
            "n_mels",
        ):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise DsMultimodalError(f"{name}: expected a positive integer, got {getattr(self, name)!r}")
        if self.hidden_dim % self.n_heads:
            raise DsMultimodalError(f"n_heads: {self.n_heads} does not divide hidden_dim {self.hidden_dim}")
        if IMAGE_SIZE % self.patch_size:
            raise DsMultimodalError(f"patch_size: {self.patch_size} does not divide image size {IMAGE_SIZE}")


class ProjectionHead(nn.Module):
    """hidden -> shared space; applied to tokens and to the pooled vector alike."""

    def __init__(self, hidden_dim: int, embed_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_dim)
        self.proj = nn.Linear(hidden_dim, embed_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(x))


def _encoder_stack(cfg: EncoderConfig, n_layers: int | None = None) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(
        cfg.hidden_dim, cfg.n_heads, 2 * cfg.hidden_dim, dropout=0.0, batch_first=True, norm_first=True
    )
    return nn.TransformerEncoder(layer, n_layers or cfg.n_layers, enable_nested_tensor=False)


def _pool_and_project(h: torch.Tensor, mask: torch.Tensor, head: ProjectionHead):
    tokens = head(h)  # (B, N, E)
    m = mask.unsqueeze(-1).to(h.dtype)
    pooled = (h * m).sum(1) / m.sum(1).clamp(min=1)  # (B, hidden) mean over real tokens
    return F.normalize(head(pooled), dim=-1), tokens, mask


# ---- text ----


def tokenize(texts: list[str] | tuple[str, ...], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bytes -> ids (1..256), LEFT-padded with 0 to the longest text (ds-models' padding side)."""
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise DsMultimodalError("text: expected a list of strings")
    if len(texts) == 0:
        raise DsMultimodalError("text: expected at least one string, got an empty list")
    rows = [[b + 1 for b in t.encode("utf-8")][:max_len] for t in texts]
    if any(len(r) == 0 for r in rows):
        raise DsMultimodalError("text: empty string; every text needs at least one character")
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), PAD_ID, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r) :] = torch.tensor(r)
    return ids, ids != PAD_ID


class TextEncoder(nn.Module):
    """A small ds-models decoder over a byte vocabulary, mean-pooled over the real tokens.

    backbone: a `ds_models.Transformer` (or any module with `.hidden(ids, attention_mask=mask)`
    returning (B, T, hidden_dim)) with vocab_size >= 257.
    """

    def __init__(self, cfg: EncoderConfig, backbone: nn.Module | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone or Transformer(
            ModelConfig(
                vocab_size=257, d_model=cfg.hidden_dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                n_kv_heads=cfg.n_heads, d_ff=2 * cfg.hidden_dim, max_seq_len=cfg.max_text_len,
            )
        )  # fmt: skip
        self.head = ProjectionHead(cfg.hidden_dim, cfg.embed_dim)

    def forward(self, texts: list[str] | tuple[torch.Tensor, torch.Tensor]):
        """texts: a list of strings, or already tokenized `(ids (B, T), mask (B, T))` as `tokenize` gives."""
        device = self.head.proj.weight.device
        pretokenized = isinstance(texts, tuple) and all(isinstance(t, torch.Tensor) for t in texts)
        ids, mask = texts if pretokenized else tokenize(texts, self.cfg.max_text_len)
        ids, mask = ids.to(device), mask.to(device)
        h = self.backbone.hidden(ids, attention_mask=mask)  # (B, T, hidden)
        return _pool_and_project(h, mask, self.head)


# ---- image ----


def check_images(images: torch.Tensor, name: str = "image") -> torch.Tensor:
    """Accept (B, 1, 16, 16) or (B, 16, 16) floats; anything else is a DsMultimodalError naming `name`."""
    if not isinstance(images, torch.Tensor):
        raise DsMultimodalError(f"{name}: expected a torch.Tensor, got {type(images).__name__}")
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.dim() != 4:
        raise DsMultimodalError(
            f"{name}: expected shape (B, 1, {IMAGE_SIZE}, {IMAGE_SIZE}), got {tuple(images.shape)}"
        )
    if images.shape[1] != 1:
        raise DsMultimodalError(f"{name}: expected 1 (greyscale) channel, got {images.shape[1]} channels")
    if tuple(images.shape[-2:]) != (IMAGE_SIZE, IMAGE_SIZE):
        raise DsMultimodalError(
            f"{name}: expected {IMAGE_SIZE}x{IMAGE_SIZE} pixels, got {tuple(images.shape[-2:])}"
        )
    if images.shape[0] == 0:
        raise DsMultimodalError(f"{name}: empty batch")
    if not images.is_floating_point():
        raise DsMultimodalError(f"{name}: expected floating point pixels in [0, 1], got {images.dtype}")
    return images


class ImageEncoder(nn.Module):
    """Patch transformer (ViT): 4x4 patches -> linear -> + position -> encoder -> mean pool -> head.

    backbone: a module mapping patch embeddings (B, P, hidden_dim) to (B, P, hidden_dim).
    """

    def __init__(self, cfg: EncoderConfig, backbone: nn.Module | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        n_patches = (IMAGE_SIZE // cfg.patch_size) ** 2
        self.patch = nn.Linear(cfg.patch_size**2, cfg.hidden_dim)
        self.pos = nn.Parameter(torch.randn(1, n_patches, cfg.hidden_dim) * 0.02)
        self.backbone = backbone or _encoder_stack(cfg)
        self.head = ProjectionHead(cfg.hidden_dim, cfg.embed_dim)

    def hidden(self, images: torch.Tensor) -> torch.Tensor:
        p = self.cfg.patch_size
        B = images.shape[0]
        x = images.unfold(2, p, p).unfold(3, p, p)  # (B, 1, 4, 4, p, p)
        x = x.reshape(B, -1, p * p)  # (B, P, p*p)
        return self.backbone(self.patch(x) + self.pos)  # (B, P, hidden)

    def forward(self, images: torch.Tensor):
        images = check_images(images).to(self.head.proj.weight.device)
        h = self.hidden(images)
        return _pool_and_project(h, torch.ones(h.shape[:2], dtype=torch.bool, device=h.device), self.head)


# ---- video ----


class VideoEncoder(nn.Module):
    """The image encoder on every frame, mean-pooled per frame, then temporal attention over frames.

    Tokens are the frames (B, F, E). image_encoder: a (pretrained) ImageEncoder to share or reuse.
    """

    def __init__(
        self, cfg: EncoderConfig, image_encoder: ImageEncoder | None = None, max_frames: int = 32
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.max_frames = max_frames
        self.image = image_encoder or ImageEncoder(cfg)
        self.time_pos = nn.Parameter(torch.randn(1, max_frames, cfg.hidden_dim) * 0.02)
        self.temporal = _encoder_stack(cfg, n_layers=1)
        self.head = ProjectionHead(cfg.hidden_dim, cfg.embed_dim)

    def forward(self, videos: torch.Tensor):
        if not isinstance(videos, torch.Tensor) or videos.dim() not in (4, 5):
            shape = tuple(videos.shape) if isinstance(videos, torch.Tensor) else type(videos).__name__
            raise DsMultimodalError(
                f"video: expected shape (B, frames, 1, {IMAGE_SIZE}, {IMAGE_SIZE}), got {shape}"
            )
        if videos.dim() == 4:
            videos = videos.unsqueeze(2)
        B, n_frames = videos.shape[:2]
        if n_frames == 0:
            raise DsMultimodalError("video: empty video (0 frames); expected at least 1 frame")
        if n_frames > self.max_frames:
            raise DsMultimodalError(f"video: {n_frames} frames, at most {self.max_frames} supported")
        frames = check_images(videos.reshape(B * n_frames, *videos.shape[2:]), name="video")
        frames = frames.to(self.head.proj.weight.device)
        per_frame = self.image.hidden(frames).mean(1).reshape(B, n_frames, -1)  # (B, F, hidden)
        h = self.temporal(per_frame + self.time_pos[:, :n_frames])  # (B, F, hidden)
        return _pool_and_project(h, torch.ones(B, n_frames, dtype=torch.bool, device=h.device), self.head)


# ---- audio ----


def mel_filterbank(n_mels: int, n_fft: int, sample_rate: int) -> torch.Tensor:
    """(n_fft//2+1, n_mels) triangular filters on the HTK mel scale, 0 Hz to Nyquist."""

    def hz_to_mel(f):
        return 2595.0 * math.log10(1.0 + f / 700.0)

    mels = torch.linspace(hz_to_mel(0.0), hz_to_mel(sample_rate / 2), n_mels + 2)
    hz = 700.0 * (10 ** (mels / 2595.0) - 1.0)  # (n_mels+2,) band edges
    freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1)  # (n_freq,)
    lo, mid, hi = hz[:-2], hz[1:-1], hz[2:]
    up = (freqs[:, None] - lo) / (mid - lo)
    down = (hi - freqs[:, None]) / (hi - mid)
    return torch.clamp(torch.minimum(up, down), min=0.0)


def check_audio(audio: torch.Tensor, sample_rate: int) -> torch.Tensor:
    if sample_rate != SAMPLE_RATE:
        raise DsMultimodalError(
            f"sample_rate: expected {SAMPLE_RATE} Hz audio, got {sample_rate} Hz; resample first"
        )
    if not isinstance(audio, torch.Tensor) or audio.dim() not in (1, 2) or not audio.is_floating_point():
        shape = tuple(audio.shape) if isinstance(audio, torch.Tensor) else type(audio).__name__
        raise DsMultimodalError(
            f"audio: expected a float tensor (B, samples) at {SAMPLE_RATE} Hz, got {shape}"
        )
    if audio.dim() == 1:
        audio = audio.unsqueeze(0)
    if audio.shape[0] == 0 or audio.shape[1] < 400:
        raise DsMultimodalError(
            f"audio: expected at least 400 samples per clip, got shape {tuple(audio.shape)}"
        )
    silent = audio.abs().amax(dim=1) < 1e-4
    if silent.any():
        raise DsMultimodalError(f"audio: clip {int(silent.nonzero()[0])} is silent (peak < 1e-4)")
    return audio


class AudioEncoder(nn.Module):
    """Log-mel spectrogram (torch.stft + a mel filterbank) -> stacks of 4 frames -> transformer.

    backbone: a module mapping (B, N, hidden_dim) mel-frame tokens to (B, N, hidden_dim).
    """

    def __init__(self, cfg: EncoderConfig, backbone: nn.Module | None = None, max_tokens: int = 256) -> None:
        super().__init__()
        self.cfg = cfg
        self.register_buffer("window", torch.hann_window(cfg.n_fft), persistent=False)
        self.register_buffer("mel", mel_filterbank(cfg.n_mels, cfg.n_fft, SAMPLE_RATE), persistent=False)
        self.frame = nn.Linear(cfg.n_mels * cfg.mel_frames_per_token, cfg.hidden_dim)
        self.pos = nn.Parameter(torch.randn(1, max_tokens, cfg.hidden_dim) * 0.02)
        self.backbone = backbone or _encoder_stack(cfg)
        self.head = ProjectionHead(cfg.hidden_dim, cfg.embed_dim)

    def log_mel(self, audio: torch.Tensor) -> torch.Tensor:
        """(B, S) waveform -> (B, frames, n_mels) log-mel, per-clip normalised (loudness-invariant)."""
        spec = torch.stft(
            audio, self.cfg.n_fft, self.cfg.hop_length, window=self.window, return_complex=True
        )  # (B, n_freq, frames)
        power = spec.abs().pow(2).transpose(1, 2)  # (B, frames, n_freq)
        logmel = torch.log(power @ self.mel + 1e-6)  # (B, frames, n_mels)
        return (logmel - logmel.mean((1, 2), keepdim=True)) / (logmel.std((1, 2), keepdim=True) + 1e-5)

    def forward(self, audio: torch.Tensor, sample_rate: int = SAMPLE_RATE):
        audio = check_audio(audio, sample_rate).to(self.head.proj.weight.device)
        m = self.log_mel(audio)
        k = self.cfg.mel_frames_per_token
        B, n = m.shape[0], m.shape[1] // k
        x = self.frame(m[:, : n * k].reshape(B, n, k * self.cfg.n_mels))  # (B, N, hidden)
        if n > self.pos.shape[1]:
            raise DsMultimodalError(f"audio: clip too long ({audio.shape[1]} samples)")
        h = self.backbone(x + self.pos[:, :n])
        return _pool_and_project(h, torch.ones(B, n, dtype=torch.bool, device=h.device), self.head)
