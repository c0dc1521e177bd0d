"""MultimodalAligner: the four encoders, a shared logit scale and the calibration, plus checkpoints.

A checkpoint is a model directory: config.yaml (AlignerConfig), model.safetensors (all weights,
shared tensors stored once) and provenance.json. Loading never unpickles anything.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import yaml
from safetensors.torch import load_model, save_model

from ds_multimodal.calibration import CrossModalCalibration
from ds_multimodal.data import SAMPLE_RATE
from ds_multimodal.encoders import AudioEncoder, EncoderConfig, ImageEncoder, TextEncoder, VideoEncoder
from ds_multimodal.errors import DsMultimodalError

CONFIG_FILE, WEIGHTS_FILE = "config.yaml", "model.safetensors"


@dataclass
class AlignerConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    audio: bool = True  # build the audio encoder

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> AlignerConfig:
        if not isinstance(d, dict):
            raise DsMultimodalError(f"{where}: expected a mapping, got {type(d).__name__}")
        enc = d.get("encoder", {})
        known = {f.name for f in dataclasses.fields(EncoderConfig)}
        bad = set(enc) - known if isinstance(enc, dict) else {"encoder"}
        if bad:
            raise DsMultimodalError(f"{where}: encoder.{sorted(bad)[0]}: unknown field")
        return cls(encoder=EncoderConfig(**enc), audio=bool(d.get("audio", True)))


class MultimodalAligner(nn.Module):
    """Text, image, video (sharing the image encoder) and audio encoders into one normalised space.

    Pass pretrained modules through `text_encoder=`, `image_encoder=` ... to use them instead.
    """

    def __init__(
        self,
        config: AlignerConfig | None = None,
        *,
        text_encoder: nn.Module | None = None,
        image_encoder: nn.Module | None = None,
        video_encoder: nn.Module | None = None,
        audio_encoder: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.config = config or AlignerConfig()
        cfg = self.config.encoder
        self.text = text_encoder or TextEncoder(cfg)
        self.image = image_encoder or ImageEncoder(cfg)
        self.video = video_encoder or VideoEncoder(cfg, image_encoder=self.image)
        self.audio = (audio_encoder or AudioEncoder(cfg)) if self.config.audio else None
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.calibration = CrossModalCalibration(cfg.embed_dim, cfg.n_heads)
        # Fitted after training by fit_calibration (which switches its gradients on for itself); frozen
        # here so that training loops (and DDP) see only parameters the loss reaches.
        self.calibration.requires_grad_(False)

    def encode(self, modality: str, value, sample_rate: int = SAMPLE_RATE):
        """(embedding (B, E), tokens (B, N, E), mask (B, N)) for one modality."""
        if modality == "audio":
            if self.audio is None:
                raise DsMultimodalError("audio: this model was built without an audio encoder (audio: false)")
            return self.audio(value, sample_rate=sample_rate)
        if modality not in ("text", "image", "video"):
            raise DsMultimodalError(f"modality: expected text, image, video or audio, got {modality!r}")
        return getattr(self, modality)(value)

    def embed(self, text=None, image=None, video=None, audio=None, sample_rate: int = SAMPLE_RATE):
        """Normalised embeddings {modality: (B, E)} for the modalities given."""
        given = {"text": text, "image": image, "video": video, "audio": audio}
        given = {m: v for m, v in given.items() if v is not None}
        if not given:
            raise DsMultimodalError("embed: give at least one of text=, image=, video=, audio=")
        return {m: self.encode(m, v, sample_rate)[0] for m, v in given.items()}

    def forward(self, batch: dict) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """A training batch -> (normalised embeddings {modality: (B, E)}, logit scale).

        batch keys (any subset of at least two modalities): text_ids / text_mask (B, T) as
        `encoders.tokenize` makes them, image (B, 1, 16, 16), video (B, F, 1, 16, 16), audio (B, S) at
        16 kHz; missing or None modalities are skipped. Going through forward (not `encode`) keeps a
        DDP-wrapped model's gradient hooks in the loop.
        """
        emb = {}
        if batch.get("text_ids") is not None:
            emb["text"] = self.text((batch["text_ids"], batch["text_mask"]))[0]
        for m in ("image", "video", "audio"):
            if batch.get(m) is not None:
                emb[m] = self.encode(m, batch[m])[0]
        # CLIP caps 1/temperature at 100; clamping here (not after the optimizer step) keeps the cap
        # whatever loop drives the training
        return emb, self.logit_scale.clamp(0.0, math.log(100.0))

    # ---- checkpoints ----

    def save_pretrained(self, directory: str | os.PathLike[str], provenance: dict | None = None) -> None:
        from ds_models import write_provenance

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=d, suffix=".yaml", delete=False) as f:
            yaml.safe_dump(self.config.to_dict(), f, sort_keys=False)
        os.replace(f.name, d / CONFIG_FILE)
        tmp = d / (WEIGHTS_FILE + ".tmp")
        save_model(self, str(tmp))
        os.replace(tmp, d / WEIGHTS_FILE)
        write_provenance(d, kind="ds-multimodal aligner", **(provenance or {}))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str], device: str | torch.device = "cpu"):
        d = Path(directory)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (d / name).is_file():
                raise DsMultimodalError(
                    f"{d / name}: file not found (expected a ds-multimodal model directory)"
                )
        try:
            data = yaml.safe_load((d / CONFIG_FILE).read_text(encoding="utf-8"))
        except yaml.YAMLError:
            raise DsMultimodalError(f"{d / CONFIG_FILE}: invalid YAML") from None
        model = cls(AlignerConfig.from_dict(data, where=str(d / CONFIG_FILE)))
        try:
            missing, unexpected = load_model(model, str(d / WEIGHTS_FILE), strict=False, device=str(device))
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise DsMultimodalError(f"{d / WEIGHTS_FILE}: cannot load: {e}") from None
        if missing or unexpected:
            key = (missing or unexpected)[0]
            raise DsMultimodalError(f"{d / WEIGHTS_FILE}: {key}: weights do not match config.yaml")
        return model.to(device).eval()


def embed(
    model: MultimodalAligner, text=None, image=None, video=None, audio=None, sample_rate: int = SAMPLE_RATE
):
    """Embed any modalities with `model` (no gradients): {modality: (B, E) L2-normalised}."""
    with torch.no_grad():
        return model.embed(text=text, image=image, video=video, audio=audio, sample_rate=sample_rate)
