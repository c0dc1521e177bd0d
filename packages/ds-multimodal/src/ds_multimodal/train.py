"""Training: a plain AdamW loop on the cross-modal loss, then fitting the calibration.

Stage 1 trains the encoders and the shared logit scale on the train split with `cross_modal_loss`
(labels given, so same-digit items in a batch count as positives). Stage 2 freezes the encoders and
fits `CrossModalCalibration` on the held-out calibration split (`fit_calibration`: a gated
cross-attention kept only if it helps on a held-out half, then one temperature factor per modality pair).
The same model trains through ds-trainer with the `align` task (task.py); this loop is the light path.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ds_multimodal.calibration import class_probs, pair_name
from ds_multimodal.data import CLASS_CAPTIONS, DigitsDataset, load_digits_multimodal
from ds_multimodal.encoders import EncoderConfig
from ds_multimodal.errors import DsMultimodalError
from ds_multimodal.losses import cross_modal_loss
from ds_multimodal.model import AlignerConfig, MultimodalAligner
from ds_multimodal.retrieval import calibrated_text_cosine, encode_all


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
    calibration_steps: int = 30  # Adam steps of the gated cross-attention (see fit_calibration)
    calibration_lr: float = 2e-2
    # torch intra-op threads while training. The ops are tiny (width 64), so threads gain little and
    # their barriers cost much on a shared CPU: 2 threads were 7x slower than 1 at load average 7 on 2 cores.
    num_threads: int = 1
    max_train_items: int = 0  # 0 = the whole train split (tests use a few hundred)
    cache_dir: str = ""  # where synthesised audio is cached ("" = ~/.cache/ds-multimodal)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)

    def __post_init__(self) -> None:
        if isinstance(self.encoder, dict):
            self.encoder = EncoderConfig(**self.encoder)
        for name in ("epochs", "batch_size", "num_threads"):
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


# The re-scorer must lower the held-out zero-shot NLL by at least this share and this many nats to be
# kept: 90 held-out items are few (a 1% gain is noise), and a gain of 1e-8 on an NLL already at 1e-8 is
# not worth an attention pass per (item, caption) pair.
GATE_MIN_GAIN, GATE_MIN_NATS = 0.05, 1e-3


def _nll(logits: torch.Tensor, gallery_labels: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """NLL of the retrieval digit probabilities (see calibration.class_probs)."""
    return F.nll_loss(class_probs(logits, gallery_labels).clamp_min(1e-12).log(), labels)


def _fit_log_scale(
    problems: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], base: torch.Tensor
) -> float:
    """The log factor t minimising the mean NLL of exp(base + t) * cos over (cos, gallery_labels, labels)."""
    t = torch.zeros((), device=base.device, requires_grad=True)
    opt = torch.optim.LBFGS([t], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = sum(_nll((base + t).exp() * cos, g, y) for cos, g, y in problems) / len(problems)
        loss.backward()
        return loss

    opt.step(closure)
    return float(t.detach().clamp(-3.0, 3.0))


def fit_calibration(
    model: MultimodalAligner, data: DigitsDataset, steps: int = 30, lr: float = 2e-2, seed: int = 0
) -> dict:
    """Fit model.calibration on held-out `data` (the calibration split) with the encoders frozen.

    1. Per non-text modality m, the gated cross-attention is trained (Adam, `steps` full-batch steps)
       on one seeded half of `data` for zero-shot classification by the class captions and scored on the
       other, both ways round; it is kept (as fitted on the first half) only if in both folds it lowers
       the held-out zero-shot NLL by GATE_MIN_GAIN (5%) and GATE_MIN_NATS compared with temperature
       scaling alone; else its gate is closed again (the identity). The attention starts from fresh
       weights drawn from `seed`, so refitting gives the same result.
    2. Per modality pair, the factor on the trained scale is fitted (LBFGS) to minimise the NLL of the
       retrieval digit probabilities on all of `data`, both directions (and zero-shot for text pairs).

    Returns a report: {"gate": {m: {"kept", "nll_closed": [fold 1, fold 2], "nll_open": [...]}},
    "scale": {pair: factor}}.
    Uses its own random generator, so the caller's random stream is untouched.
    """
    was_training = model.training
    enc = encode_all(model, data)
    cal = model.calibration
    cal.requires_grad_(True)
    device = enc["text"][0].device
    labels = data.labels.to(device)
    base = model.logit_scale.detach().clamp(0.0, math.log(100.0))
    with torch.no_grad():
        cls = model.encode("text", list(CLASS_CAPTIONS))
    cls_labels = torch.arange(len(CLASS_CAPTIONS), device=device)
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)).to(device)
    half_a, half_b = perm[: len(perm) // 2], perm[len(perm) // 2 :]
    report: dict = {"gate": {}, "scale": {}}
    others = [m for m in enc if m != "text"]
    for m in others:
        x = enc[m]

        def zero_shot_cos(idx, m=m, x=x):
            return cal.text_cosine(m, x[0][idx], x[1][idx], *cls)

        def fit_and_score(fit_idx, score_idx, m=m):
            """Held-out zero-shot NLL on score_idx after fitting on fit_idx: (temperature only, + attention)."""
            with torch.no_grad():
                cal.gate[m].zero_()
                # fresh attention weights from `seed` (a refit, e.g. at every checkpoint, gives the same
                # result), made on CPU under a forked RNG so the caller's random stream is untouched
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    fresh = torch.nn.MultiheadAttention(
                        cal.attn[m].embed_dim, cal.attn[m].num_heads, batch_first=True
                    )
                cal.attn[m].load_state_dict(fresh.state_dict())
            cal.eval()
            with torch.no_grad():
                cos_fit, cos_score = zero_shot_cos(fit_idx), zero_shot_cos(score_idx)
            t = _fit_log_scale([(cos_fit, cls_labels, labels[fit_idx])], base)
            closed = float(_nll((base + t).exp() * cos_score, cls_labels, labels[score_idx]))
            with torch.no_grad():
                cal.gate[m].fill_(0.1)  # tanh(0) = 0 would give the attention no gradient
            t_open = torch.tensor(t, device=device, requires_grad=True)
            opt = torch.optim.Adam([*cal.attn[m].parameters(), cal.gate[m], t_open], lr=lr)
            cal.train()
            for _ in range(steps):
                loss = _nll((base + t_open).exp() * zero_shot_cos(fit_idx), cls_labels, labels[fit_idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
            cal.eval()
            with torch.no_grad():
                opened = float(
                    _nll((base + t_open).exp() * zero_shot_cos(score_idx), cls_labels, labels[score_idx])
                )
            return closed, opened

        # two folds: fit on B / score on A, then fit on A / score on B (the attention left in place)
        folds = [fit_and_score(half_b, half_a), fit_and_score(half_a, half_b)]
        kept = all(o < min(c * (1 - GATE_MIN_GAIN), c - GATE_MIN_NATS) for c, o in folds)
        if not kept:
            with torch.no_grad():
                cal.gate[m].zero_()
        report["gate"][m] = {
            "kept": kept,
            "nll_closed": [c for c, _ in folds],
            "nll_open": [o for _, o in folds],
        }
    # 2. one factor per pair on the whole split, with the gates as decided
    cal.eval()
    for i, a in enumerate(enc):
        for b in list(enc)[i + 1 :]:
            with torch.no_grad():
                if "text" in (a, b):
                    m = b if a == "text" else a
                    cos = calibrated_text_cosine(model, m, enc[m], enc["text"])  # (N items, N captions)
                    problems = [
                        (calibrated_text_cosine(model, m, enc[m], cls), cls_labels, labels),  # zero-shot
                        (cos, labels, labels),  # item -> captions
                        (cos.T, labels, labels),  # caption -> items
                    ]
                else:
                    cos = enc[a][0] @ enc[b][0].T
                    problems = [(cos, labels, labels), (cos.T, labels, labels)]
            t = _fit_log_scale(problems, base)
            with torch.no_grad():
                cal.log_scale[pair_name(a, b)].fill_(t)
            report["scale"][pair_name(a, b)] = math.exp(t)
    cal.requires_grad_(False)
    model.train(was_training)
    return report


def train(cfg: TrainConfig, progress: bool = True, log=print) -> tuple[MultimodalAligner, dict]:
    """Train on the built-in dataset; returns the model and a history dict (losses, timings)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.num_threads)
    try:
        return _train(cfg, progress, log)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: TrainConfig, progress: bool, log) -> tuple[MultimodalAligner, dict]:
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
    history["calibration"] = fit_calibration(model, cal, cfg.calibration_steps, cfg.calibration_lr, cfg.seed)
    history["calibration_seconds"] = time.perf_counter() - t1
    return model.eval(), history
