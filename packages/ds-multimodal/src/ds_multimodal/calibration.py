"""CrossModalCalibration: turns cosine similarities into calibrated retrieval probabilities.

What it calibrates. Retrieval turns a query's scores against a gallery into probabilities with a
softmax, `p(j | query) = softmax_j(s * cos(query, item_j))`, and, as every gallery item shows a digit,
into the probability of each digit: `p(c | query) = sum of p(j | query) over the items j showing c`.
The scale s is the one logit scale learned in training, shared by all six modality pairs, although
their similarity ranges differ (an image and its own video share the image encoder and score much
higher than an image and a spoken word), so these probabilities are over- or under-confident in a way
that depends on the pair. The module changes the score of a (query, gallery item) pair in two ways:

1. a learned factor per modality pair on the trained scale: logits = exp(logit_scale + log_scale_pair) * cos
   (temperature scaling, Guo et al., 2017); it never reorders a ranking;
2. for pairs with text, a gated cross-attention re-scoring: the item's tokens (image patches, video
   frames, audio frames) attend to the caption's tokens and `tanh(g_m)` times the mean attended vector
   is added to the item's embedding before re-normalising; `g_m = 0` is the identity.

`fit_calibration` (train.py) fits it after the encoders, with them frozen, on the calibration split,
which training never sees. The gated attention of a modality is trained on one half of that split and
scored on the other, both ways round, and kept only if it lowers the held-out zero-shot negative
log-likelihood in both folds (otherwise its gate is closed again: with 180 items a ~17k-parameter
re-scorer per modality overfits easily); then each pair's factor is fitted by minimising the NLL of the
retrieval digit probabilities above on the whole split. Both starting values (gate 0, factor 0) make
the module the identity, so an unfitted module changes nothing.
"""

from __future__ import annotations

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


def class_probs(logits: torch.Tensor, gallery_labels: torch.Tensor, n_classes: int = 10) -> torch.Tensor:
    """Retrieval logits (Q, G) -> (Q, n_classes): the softmax mass of the gallery items of each class."""
    p = logits.softmax(1)  # (Q, G)
    out = torch.zeros(logits.shape[0], n_classes, dtype=p.dtype, device=p.device)
    return out.index_add_(1, gallery_labels.to(p.device), p)


class CrossModalCalibration(nn.Module):
    def __init__(self, embed_dim: int, n_heads: int = 4) -> None:
        super().__init__()
        self.attn = nn.ModuleDict(
            {m: nn.MultiheadAttention(embed_dim, n_heads, batch_first=True) for m in NON_TEXT}
        )
        self.gate = nn.ParameterDict({m: nn.Parameter(torch.zeros(1)) for m in NON_TEXT})
        # log of the factor on the trained scale, per pair: 0 = the trained scale unchanged
        self.log_scale = nn.ParameterDict({p: nn.Parameter(torch.zeros(1)) for p in PAIRS})

    def scale(self, a: str, b: str, logit_scale: torch.Tensor) -> torch.Tensor:
        """The calibrated 1/temperature of pair a-b given the model's trained `logit_scale`."""
        return (logit_scale + self.log_scale[pair_name(a, b)]).exp()

    def pair_logits(
        self, a: str, b: str, a_emb: torch.Tensor, b_emb: torch.Tensor, logit_scale: torch.Tensor
    ) -> torch.Tensor:
        """Calibrated logits (Ba, Bb) from the pooled embeddings (temperature only): (Ba, E), (Bb, E)."""
        return self.scale(a, b, logit_scale) * a_emb @ b_emb.T

    def text_cosine(
        self,
        modality: str,
        x_emb: torch.Tensor,  # (Bx, E) normalised
        x_tokens: torch.Tensor,  # (Bx, N, E)
        text_emb: torch.Tensor,  # (Bt, E) normalised
        text_tokens: torch.Tensor,  # (Bt, T, E)
        text_mask: torch.Tensor,  # (Bt, T) True = real token
    ) -> torch.Tensor:
        """Cosine (Bx, Bt) of every item against every caption after the gated cross-attention."""
        if modality not in NON_TEXT:
            raise DsMultimodalError(f"modality: expected one of {NON_TEXT}, got {modality!r}")
        gate = torch.tanh(self.gate[modality])
        if not self.training and float(gate) == 0.0:  # closed gate: exactly the plain cosine, no attention
            return x_emb @ text_emb.T
        Bx, N, E = x_tokens.shape
        Bt, T, _ = text_tokens.shape
        q = x_tokens[:, None].expand(Bx, Bt, N, E).reshape(Bx * Bt, N, E)
        kv = text_tokens[None].expand(Bx, Bt, T, E).reshape(Bx * Bt, T, E)
        pad = (~text_mask)[None].expand(Bx, Bt, T).reshape(Bx * Bt, T)
        attended, _ = self.attn[modality](
            q, kv, kv, key_padding_mask=pad, need_weights=False
        )  # (Bx*Bt, N, E)
        delta = attended.mean(1).reshape(Bx, Bt, E)
        refined = F.normalize(x_emb[:, None] + gate * delta, dim=-1)  # (Bx, Bt, E)
        return (refined * text_emb[None]).sum(-1)  # (Bx, Bt)

    def text_logits(self, modality: str, *inputs: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
        """Calibrated logits (Bx, Bt) of items against captions; inputs as for `text_cosine`."""
        return self.scale(modality, "text", logit_scale) * self.text_cosine(modality, *inputs)
