"""Retrieval helpers and the evaluation: Recall@k for every modality pair, zero-shot classification, ECE.

Recall on this dataset is CLASS-LEVEL: captions name the digit only, so many items share a caption.
For a query from modality x (item i, digit d) against the gallery of all test items of modality y,
Recall@k = 1 if any of the k highest-scoring gallery items shows digit d. For text -> y the queries
are the test items' own captions (four templates per digit), so text -> y Recall@1 is the share of
captions whose best match has the right digit. Zero-shot classification is the stricter per-item
measure: item -> the 10 class captions ("the digit seven"), accuracy of the argmax.

Calibration is measured on retrieval probabilities: a query's softmax over the gallery, summed per
digit (`calibration.class_probs`), gives the probability that the retrieved item shows each digit;
ECE (15 equal-width bins) compares the top digit's probability with how often it is right. For
zero-shot the gallery is the 10 class captions, one per digit, so this is the plain softmax.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

from ds_multimodal.calibration import class_probs
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
def calibrated_text_cosine(model, modality, x, text, chunk: int = 16) -> torch.Tensor:
    """(N_x, N_text) cosines after the calibration's gated cross-attention, in chunks of items."""
    rows = [
        model.calibration.text_cosine(modality, x[0][i : i + chunk], x[1][i : i + chunk], *text)
        for i in range(0, x[0].shape[0], chunk)
    ]
    return torch.cat(rows)


def _scores(logits: torch.Tensor, query_labels, gallery_labels) -> dict:
    probs = class_probs(logits, gallery_labels)
    return {
        "R@1": recall_at_k(logits, query_labels, gallery_labels, 1),
        "R@5": recall_at_k(logits, query_labels, gallery_labels, 5),
        "ECE": expected_calibration_error(probs, query_labels),
    }


@torch.no_grad()
def evaluate(model: MultimodalAligner, data: DigitsDataset) -> dict:
    """Per ordered modality pair and for zero-shot classification: Recall@1/5 and the ECE of the
    retrieval digit probabilities, with the calibration off (trained scale) and on."""
    model.eval()
    enc = encode_all(model, data)
    labels = data.labels.to(enc["text"][0].device)
    base = model.logit_scale.clamp(0.0, math.log(100.0))
    cal = model.calibration
    results: dict = {
        "retrieval": {},
        "zero_shot": {},
        "n_items": len(data),
        "audio_reason": data.audio_reason,
    }
    text_cos = {m: calibrated_text_cosine(model, m, enc[m], enc["text"]) for m in enc if m != "text"}
    for q in enc:
        for g in enc:
            if q == g:
                continue
            off = base.exp() * enc[q][0] @ enc[g][0].T  # (Nq, Ng)
            if "text" in (q, g):
                other = g if q == "text" else q
                cos = text_cos[other] if q == other else text_cos[other].T
                on = cal.scale(q, g, base) * cos
            else:
                on = cal.pair_logits(q, g, enc[q][0], enc[g][0], base)
            r_off, r_on = _scores(off, labels, labels), _scores(on, labels, labels)
            results["retrieval"][f"{q}->{g}"] = {**r_off, **{f"{k} cal": v for k, v in r_on.items()}}
    cls = model.encode("text", list(CLASS_CAPTIONS))
    for m in enc:
        if m == "text":
            continue
        off = base.exp() * enc[m][0] @ cls[0].T  # (N, 10)
        on = cal.scale(m, "text", base) * calibrated_text_cosine(model, m, enc[m], cls)
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
        f"retrieval on {results['n_items']} test items (class-level Recall@k; ECE of the retrieval digit "
        "probabilities, 15 bins; 'cal' = CrossModalCalibration on)",
        "| query -> gallery | R@1 | R@5 | ECE | R@1 cal | R@5 cal | ECE cal |",
        "|---|---|---|---|---|---|---|",
    ]
    for pair, r in results["retrieval"].items():
        lines.append(
            f"| {pair} | {r['R@1']:.3f} | {r['R@5']:.3f} | {r['ECE']:.3f} "
            f"| {r['R@1 cal']:.3f} | {r['R@5 cal']:.3f} | {r['ECE cal']:.3f} |"
        )
    n = len(results["retrieval"])
    mean = {k: sum(r[k] for r in results["retrieval"].values()) / n for k in ("ECE", "ECE cal")}
    lines.append(f"| mean over {n} pairs | | | {mean['ECE']:.3f} | | | {mean['ECE cal']:.3f} |")
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
