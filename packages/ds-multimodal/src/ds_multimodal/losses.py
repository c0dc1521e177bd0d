"""Contrastive losses: InfoNCE per modality pair and the weighted cross-modal loss.

Notation: a batch holds B items; item i of every modality shows the same thing. For modalities x, y
with L2-normalised embeddings X, Y (B, E) and a scale s = exp(logit_scale), the logits are
S = s * X @ Y^T (B, B). Targets: without labels, item i's positive is item i (the diagonal); with
labels (class ids), item i's target is the uniform distribution over every item j with
labels[j] == labels[i] (so a second "seven" in the batch is not pushed away as a negative).

  nce(x -> y)      = mean_i  CE(softmax(S[i, :]), target_i)     queries x, candidates y
  info_nce(x, y)   = (nce(x -> y) + nce(y -> x)) / 2             the symmetric pair loss
  L_m              = mean over the other modalities x present of nce(x -> m)
                     ("how well everything else retrieves m")
  cross_modal_loss = alpha * L_text + beta * L_image + gamma * L_video + delta_audio * L_audio

Summing L_m over all n present modalities with unit weights equals 2/(n-1) times the sum of
info_nce over all pairs, so the weights redistribute the symmetric pair losses by target modality.
A modality missing from the batch (None or absent) is left out: its L_m is not computed, it is not
a query for the others, and its weight drops out of the total. At least two modalities must be present.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ds_multimodal.errors import DsMultimodalError

MODALITIES = ("text", "image", "video", "audio")


def soft_targets(labels: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor:
    """(n, n) target distribution per row: identity, or uniform over same-label items."""
    if labels is None:
        return torch.eye(n, device=device)
    same = (labels[:, None] == labels[None, :]).float().to(device)
    return same / same.sum(1, keepdim=True)


def nce(logits: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of rows of `logits` (queries x candidates, square) against the targets."""
    target = soft_targets(labels, logits.shape[0], logits.device)
    return -(target * F.log_softmax(logits, dim=1)).sum(1).mean()


def info_nce(
    a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor | float, labels: torch.Tensor | None = None
) -> torch.Tensor:
    """Symmetric InfoNCE between two batches of normalised embeddings (B, E)."""
    scale = torch.as_tensor(logit_scale).exp()
    logits = scale * a @ b.T  # (B, B)
    return 0.5 * (nce(logits, labels) + nce(logits.T, labels))


@dataclass
class CrossModalLoss:
    total: torch.Tensor
    terms: dict[str, torch.Tensor]  # "text", "image", ... : L_m of each present modality
    pairs: dict[str, torch.Tensor]  # "text-image", ... : info_nce of each present pair (for logging)

    def log_dict(self) -> dict[str, float]:
        out = {"loss": float(self.total.detach())}
        out.update({f"loss/{m}": float(v.detach()) for m, v in self.terms.items()})
        out.update({f"pair/{p}": float(v.detach()) for p, v in self.pairs.items()})
        return out


def cross_modal_loss(
    embeddings: dict[str, torch.Tensor | None],
    alpha: float = 1.0,
    beta: float = 1.0,
    gamma: float = 1.0,
    delta_audio: float = 1.0,
    *,
    logit_scale: torch.Tensor | float = 2.659,  # log(1/0.07), CLIP's initial temperature
    labels: torch.Tensor | None = None,
    logits_fn: Callable[[str, str], torch.Tensor] | None = None,
) -> CrossModalLoss:
    """alpha*L_text + beta*L_image + gamma*L_video + delta_audio*L_audio over the modalities present.

    logits_fn(query_modality, candidate_modality) -> (B, B) replaces the default scaled cosine
    logits (used to train through `CrossModalCalibration`).
    """
    weights = {"text": alpha, "image": beta, "video": gamma, "audio": delta_audio}
    unknown = set(embeddings) - set(MODALITIES)
    if unknown:
        raise DsMultimodalError(f"embeddings: unknown modality {sorted(unknown)[0]!r}; expected {MODALITIES}")
    present = [m for m in MODALITIES if embeddings.get(m) is not None]
    if len(present) < 2:
        raise DsMultimodalError(f"embeddings: need at least two modalities in the batch, got {present}")
    sizes = {m: embeddings[m].shape[0] for m in present}
    if len(set(sizes.values())) != 1:
        raise DsMultimodalError(f"embeddings: batch sizes differ between modalities: {sizes}")
    scale = torch.as_tensor(logit_scale).exp()

    def logits(q: str, c: str) -> torch.Tensor:
        if logits_fn is not None:
            return logits_fn(q, c)
        return scale * embeddings[q] @ embeddings[c].T  # (B, B)

    directed = {(q, c): nce(logits(q, c), labels) for q in present for c in present if q != c}
    terms = {m: torch.stack([directed[(q, m)] for q in present if q != m]).mean() for m in present}
    pairs = {
        f"{a}-{b}": 0.5 * (directed[(a, b)] + directed[(b, a)])
        for i, a in enumerate(present)
        for b in present[i + 1 :]
    }
    total = sum(weights[m] * terms[m] for m in present)
    return CrossModalLoss(total=total, terms=terms, pairs=pairs)
