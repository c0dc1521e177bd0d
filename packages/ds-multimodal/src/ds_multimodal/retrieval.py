"""Retrieval helpers and the evaluation: Recall@k for every modality pair, zero-shot classification, ECE.

Recall on this dataset is CLASS-LEVEL: captions name the digit only, so many items share a caption.
For a query from modality x (item i, digit d) against the gallery of all test items of modality y,
Recall@k = 1 if any of the k highest-scoring gallery items shows digit d. For text -> y the queries
are the test items' own captions (four templates per digit), so text -> y Recall@1 is the share of
captions whose best match has the right digit. Zero-shot classification is the stricter per-item
measure: item -> the 10 class captions ("the digit seven"), accuracy of the argmax. ECE is computed
on the softmax of those zero-shot scores (15 equal-width bins).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from ds_multimodal.data import CLASS_CAPTIONS, DigitsDataset
from ds_multimodal.model import MultimodalAligner


def retrieve(query: torch.Tensor, gallery: torch.Tensor, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k gallery items per query by cosine similarity: (scores (Q, k), indices (Q, k))."""
    sim = F.normalize(query, dim=-1) @ F.normalize(gallery, dim=-1).T  # (Q, G)
    return sim.topk(min(k, gallery.shape[0]), dim=1)


def recall_at_k(
    scores: torch.Tensor, query_labels: torch.Tensor, gallery_labels: torch.Tensor, k: int
) -> float:
    """Share of queries with a same-label item among their top-k gallery items. scores (Q, G)."""
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices  # (Q, k)
    hit = (gallery_labels[top] == query_labels[:, None]).any(1)
    return float(hit.float().mean())


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """ECE: sum over confidence bins of |accuracy - mean confidence| weighted by the bin's share."""
    conf, pred = probs.max(1)
    correct = (pred == labels).float()
    edges = torch.linspace(0, 1, n_bins + 1)
    ece = torch.zeros(())
    for lo, hi in itertools.pairwise(edges):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            ece += inside.float().mean() * (correct[inside].mean() - conf[inside].mean()).abs()
    return float(ece)


@torch.no_grad()
def encode_all(model: MultimodalAligner, data: DigitsDataset, batch_size: int = 128) -> dict:
    """{modality: (emb (N, E), tokens (N, T, E), mask (N, T))} for every modality the data and model have."""
    model.eval()
    sources = {"text": data.captions, "image": data.images, "video": data.videos}
    if data.audio is not None and model.audio is not None:
        sources["audio"] = data.audio
    out = {}
    for m, values in sources.items():
        parts = [model.encode(m, values[i : i + batch_size]) for i in range(0, len(values), batch_size)]
        if m == "text":  # captions differ in length: pad tokens to the longest before concatenating
            T = max(p[1].shape[1] for p in parts)
            parts = [
                (e, F.pad(t, (0, 0, T - t.shape[1], 0)), F.pad(k, (T - k.shape[1], 0), value=False))
                for e, t, k in parts
            ]
        out[m] = tuple(torch.cat([p[j] for p in parts]) for j in range(3))
    return out


@torch.no_grad()
def calibrated_text_scores(model, modality, x, text, chunk: int = 16) -> torch.Tensor:
    """(N_x, N_text) calibrated logits, computed in chunks of items to bound memory."""
    rows = [
        model.calibration.text_logits(modality, x[0][i : i + chunk], x[1][i : i + chunk], *text)
        for i in range(0, x[0].shape[0], chunk)
    ]
    return torch.cat(rows)


@torch.no_grad()
def evaluate(model: MultimodalAligner, data: DigitsDataset) -> dict:
    """Recall@1/5 per ordered modality pair and zero-shot accuracy/ECE, calibration off and on."""
    enc = encode_all(model, data)
    labels = data.labels
    scale = model.logit_scale.exp()
    results: dict = {
        "retrieval": {},
        "zero_shot": {},
        "n_items": len(data),
        "audio_reason": data.audio_reason,
    }
    on_cache: dict[str, torch.Tensor] = {}
    for q in enc:
        for g in enc:
            if q == g:
                continue
            off = enc[q][0] @ enc[g][0].T
            if "text" in (q, g):
                other = g if q == "text" else q
                if other not in on_cache:
                    on_cache[other] = calibrated_text_scores(model, other, enc[other], enc["text"])
                on = on_cache[other] if q == other else on_cache[other].T
            else:
                on = model.calibration.pair_logits(q, g, enc[q][0], enc[g][0])
            results["retrieval"][f"{q}->{g}"] = {
                "R@1": recall_at_k(off, labels, labels, 1),
                "R@5": recall_at_k(off, labels, labels, 5),
                "R@1 cal": recall_at_k(on, labels, labels, 1),
                "R@5 cal": recall_at_k(on, labels, labels, 5),
            }
    cls = model.encode("text", list(CLASS_CAPTIONS))
    for m in enc:
        if m == "text":
            continue
        off = scale * enc[m][0] @ cls[0].T  # (N, 10)
        on = calibrated_text_scores(model, m, enc[m], cls)
        results["zero_shot"][m] = {
            "acc": float((off.argmax(1) == labels).float().mean()),
            "ECE": expected_calibration_error(off.softmax(1), labels),
            "acc cal": float((on.argmax(1) == labels).float().mean()),
            "ECE cal": expected_calibration_error(on.softmax(1), labels),
        }
    return results


def format_table(results: dict) -> str:
    """Plain-text tables (Markdown pipes) of `evaluate`'s results."""
    lines = [
        f"retrieval on {results['n_items']} test items (class-level Recall@k; 'cal' = CrossModalCalibration on)",
        "| query -> gallery | R@1 | R@5 | R@1 cal | R@5 cal |",
        "|---|---|---|---|---|",
    ]
    for pair, r in results["retrieval"].items():
        lines.append(
            f"| {pair} | {r['R@1']:.3f} | {r['R@5']:.3f} | {r['R@1 cal']:.3f} | {r['R@5 cal']:.3f} |"
        )
    lines += [
        "",
        "zero-shot classification by the 10 class captions (ECE: 15 bins, lower is better)",
        "| modality | accuracy | ECE | accuracy cal | ECE cal |",
        "|---|---|---|---|---|",
    ]
    for m, r in results["zero_shot"].items():
        lines.append(f"| {m} | {r['acc']:.3f} | {r['ECE']:.3f} | {r['acc cal']:.3f} | {r['ECE cal']:.3f} |")
    if "audio" not in results["zero_shot"]:
        lines.append(f"audio: not evaluated ({results['audio_reason']})")
    return "\n".join(lines)
