"""Training: a plain AdamW loop on the cross-modal loss, then fitting the calibration.

Stage 1 trains the encoders and the shared logit scale on the train split with `cross_modal_loss`
(labels given, so same-digit items in a batch count as positives). Stage 2 freezes the encoders and
fits `CrossModalCalibration` (gates, cross-attention, per-pair temperatures) on the calibration split
by minimising the NLL of zero-shot classification by the class captions (and, for the non-text
pairs, the label-aware InfoNCE under each pair's temperature).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ds_multimodal.data import CLASS_CAPTIONS, DigitsDataset, load_digits_multimodal
from ds_multimodal.encoders import EncoderConfig
from ds_multimodal.errors import DsMultimodalError
from ds_multimodal.losses import cross_modal_loss, nce
from ds_multimodal.model import AlignerConfig, MultimodalAligner
from ds_multimodal.retrieval import encode_all


@dataclass
class TrainConfig:
    epochs: int = 15
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.01
    seed: int = 0
    alpha: float = 1.0  # weight of L_text
    beta: float = 1.0  # weight of L_image
    gamma: float = 1.0  # weight of L_video
    delta_audio: float = 1.0  # weight of L_audio
    audio: bool = True  # use the audio modality when espeak-ng is available
    calibration_steps: int = 60
    calibration_batch: int = 64  # items per calibration step (the cross-attention scores items x captions)
    calibration_lr: float = 1e-2
    max_train_items: int = 0  # 0 = the whole train split (tests use a few hundred)
    cache_dir: str = ""  # where synthesised audio is cached ("" = ~/.cache/ds-multimodal)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)

    def __post_init__(self) -> None:
        if isinstance(self.encoder, dict):
            self.encoder = EncoderConfig(**self.encoder)
        for name in ("epochs", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise DsMultimodalError(f"{name}: expected a positive integer, got {getattr(self, name)!r}")
        if self.batch_size < 2:
            raise DsMultimodalError("batch_size: contrastive training needs at least 2 items per batch")
        for name in ("lr", "alpha", "beta", "gamma", "delta_audio"):
            if not isinstance(getattr(self, name), (int, float)) or getattr(self, name) < 0:
                raise DsMultimodalError(
                    f"{name}: expected a non-negative number, got {getattr(self, name)!r}"
                )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _batch(data: DigitsDataset, idx: torch.Tensor) -> dict:
    batch = {
        "text": [data.captions[i] for i in idx.tolist()],
        "image": data.images[idx],
        "video": data.videos[idx],
    }
    if data.audio is not None:
        batch["audio"] = data.audio[idx]
    return batch


def train_step(model: MultimodalAligner, batch: dict, labels: torch.Tensor, cfg: TrainConfig):
    """Loss of one batch; modalities missing from `batch` (absent or None) are skipped."""
    emb = {m: model.encode(m, v)[0] for m, v in batch.items() if v is not None}
    return cross_modal_loss(
        emb, cfg.alpha, cfg.beta, cfg.gamma, cfg.delta_audio, logit_scale=model.logit_scale, labels=labels
    )


def fit_calibration(
    model: MultimodalAligner,
    data: DigitsDataset,
    steps: int = 60,
    lr: float = 1e-2,
    batch: int = 64,
    seed: int = 0,
) -> list[float]:
    """Fit model.calibration on `data` with the encoders frozen; returns the loss per step."""
    enc = encode_all(model, data)
    with torch.no_grad():
        cls = model.encode("text", list(CLASS_CAPTIONS))
    model.calibration.train()
    opt = torch.optim.Adam(model.calibration.parameters(), lr=lr)
    others = [m for m in enc if m != "text"]
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        idx = torch.randperm(len(data), generator=gen)[:batch]
        labels = data.labels[idx]
        x = {m: (enc[m][0][idx], enc[m][1][idx]) for m in others}
        loss = sum(F.cross_entropy(model.calibration.text_logits(m, *x[m], *cls), labels) for m in others)
        for i, a in enumerate(others):
            for b in others[i + 1 :]:
                loss = loss + nce(model.calibration.pair_logits(a, b, x[a][0], x[b][0]), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def train(cfg: TrainConfig, progress: bool = True, log=print) -> tuple[MultimodalAligner, dict]:
    """Train on the built-in dataset; returns the model and a history dict (losses, timings)."""
    torch.manual_seed(cfg.seed)
    cache = cfg.cache_dir or None
    data = load_digits_multimodal(
        "train", seed=cfg.seed, audio=cfg.audio, cache_dir=cache, limit=cfg.max_train_items
    )
    if cfg.audio and data.audio is None:
        log(f"ds-multimodal: audio modality unavailable: {data.audio_reason}")
    model = MultimodalAligner(AlignerConfig(encoder=cfg.encoder, audio=data.audio is not None))
    encoder_params = [p for n, p in model.named_parameters() if not n.startswith("calibration.")]
    opt = torch.optim.AdamW(encoder_params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(data) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    history: dict = {"loss": [], "terms": []}
    t0 = time.perf_counter()
    bar = tqdm(total=total, disable=not progress, desc="train", unit="step")
    model.train()
    for _ in range(cfg.epochs):
        perm = torch.randperm(len(data), generator=gen)
        for s in range(steps_per_epoch):
            idx = perm[s * cfg.batch_size : (s + 1) * cfg.batch_size]
            if len(idx) < 2:
                continue
            out = train_step(model, _batch(data, idx), data.labels[idx], cfg)
            opt.zero_grad()
            out.total.backward()
            torch.nn.utils.clip_grad_norm_(encoder_params, 1.0)
            opt.step()
            sched.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))  # CLIP's cap on 1/temperature
            logged = out.log_dict()
            history["loss"].append(logged["loss"])
            history["terms"].append(logged)
            bar.set_postfix(loss=f"{logged['loss']:.3f}")
            bar.update()
    bar.close()
    history["train_seconds"] = time.perf_counter() - t0
    cal = load_digits_multimodal("calibration", seed=cfg.seed, audio=data.audio is not None, cache_dir=cache)
    t1 = time.perf_counter()
    history["calibration_loss"] = fit_calibration(
        model, cal, cfg.calibration_steps, cfg.calibration_lr, cfg.calibration_batch, cfg.seed
    )
    history["calibration_seconds"] = time.perf_counter() - t1
    return model.eval(), history
