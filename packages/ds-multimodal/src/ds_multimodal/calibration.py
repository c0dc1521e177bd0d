"""CrossModalCalibration: turns raw cosine similarities into calibrated retrieval scores.

What it calibrates. Contrastive training leaves cosine similarities whose softmax (at the single
training temperature) is badly over- or under-confident, and the same scale is shared by every pair
of modalities although their similarity ranges differ. The module changes the score of a
(non-text item, caption) pair in two ways:

1. cross-attention: the item's tokens (B, N, E) attend to the caption's tokens (T, E); the mean of
   the attended vectors, times a learned gate tanh(g_m) (g_m = 0 at start, so it starts as the
   identity), is added to the item's embedding before re-normalising. The item can thus look at the
   words of the caption it is scored against (a small cross-encoder re-scoring).
2. a learned temperature per modality pair: logits = cos / T_pair.

It is fitted after the encoders, on the held-out calibration split, by minimising the negative
log-likelihood of zero-shot classification (item -> the class captions) with the encoders frozen;
this is temperature scaling (Guo et al., 2017) plus the gated cross-attention. The measurement is
the expected calibration error (ECE, 15 equal-width confidence bins) of those zero-shot scores on the
test split, with the module off (raw cosine times the trained logit scale) and on: see
docs/benchmarks/ds-multimodal.md.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ds_multimodal.errors import DsMultimodalError

NON_TEXT = ("image", "video", "audio")
PAIRS = ("image-text", "video-text", "audio-text", "image-video", "image-audio", "video-audio")


def pair_name(a: str, b: str) -> str:
    for p in (f"{a}-{b}", f"{b}-{a}"):
        if p in PAIRS:
            return p
    raise DsMultimodalError(f"modality pair {a}-{b}: unknown; expected one of {', '.join(PAIRS)}")


class CrossModalCalibration(nn.Module):
    def __init__(
        self, embed_dim: int, n_heads: int = 4, init_logit_scale: float = math.log(1 / 0.07)
    ) -> None:
        super().__init__()
        self.attn = nn.ModuleDict(
            {m: nn.MultiheadAttention(embed_dim, n_heads, batch_first=True) for m in NON_TEXT}
        )
        self.gate = nn.ParameterDict({m: nn.Parameter(torch.zeros(1)) for m in NON_TEXT})
        # log(1 / T) per pair, so logits = exp(log_inv_temperature) * cos.
        self.log_inv_temperature = nn.ParameterDict(
            {p: nn.Parameter(torch.full((1,), float(init_logit_scale))) for p in PAIRS}
        )

    def temperature(self, a: str, b: str) -> torch.Tensor:
        return self.log_inv_temperature[pair_name(a, b)].neg().exp()

    def pair_logits(self, a: str, b: str, a_emb: torch.Tensor, b_emb: torch.Tensor) -> torch.Tensor:
        """Temperature-only calibration for a pair without text: (Ba, E), (Bb, E) -> (Ba, Bb)."""
        return self.log_inv_temperature[pair_name(a, b)].exp() * a_emb @ b_emb.T

    def text_logits(
        self,
        modality: str,
        x_emb: torch.Tensor,  # (Bx, E) normalised
        x_tokens: torch.Tensor,  # (Bx, N, E)
        text_emb: torch.Tensor,  # (Bt, E) normalised
        text_tokens: torch.Tensor,  # (Bt, T, E)
        text_mask: torch.Tensor,  # (Bt, T) True = real token
    ) -> torch.Tensor:
        """Calibrated logits (Bx, Bt) of every item against every caption."""
        if modality not in NON_TEXT:
            raise DsMultimodalError(f"modality: expected one of {NON_TEXT}, got {modality!r}")
        Bx, N, E = x_tokens.shape
        Bt, T, _ = text_tokens.shape
        q = x_tokens[:, None].expand(Bx, Bt, N, E).reshape(Bx * Bt, N, E)
        kv = text_tokens[None].expand(Bx, Bt, T, E).reshape(Bx * Bt, T, E)
        pad = (~text_mask)[None].expand(Bx, Bt, T).reshape(Bx * Bt, T)
        attended, _ = self.attn[modality](
            q, kv, kv, key_padding_mask=pad, need_weights=False
        )  # (Bx*Bt, N, E)
        delta = attended.mean(1).reshape(Bx, Bt, E)
        refined = F.normalize(x_emb[:, None] + torch.tanh(self.gate[modality]) * delta, dim=-1)  # (Bx, Bt, E)
        cos = (refined * text_emb[None]).sum(-1)  # (Bx, Bt)
        return self.log_inv_temperature[pair_name(modality, "text")].exp() * cos
