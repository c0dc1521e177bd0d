import math

import pytest
import torch
import torch.nn.functional as F

from ds_multimodal import DsMultimodalError, cross_modal_loss, info_nce


def _hand_ce(logits, targets):
    """Row-wise cross entropy written out: -sum_j t_ij * (l_ij - log sum_k exp l_ik), averaged."""
    total = 0.0
    for i in range(len(logits)):
        lse = math.log(sum(math.exp(v) for v in logits[i]))
        total += -sum(t * (v - lse) for t, v in zip(targets[i], logits[i]))
    return total / len(logits)


def test_info_nce_matches_hand_computation():
    a = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]], dtype=torch.float64), dim=-1)
    b = F.normalize(torch.tensor([[0.8, 0.6], [0.0, 1.0], [-1.0, 0.2]], dtype=torch.float64), dim=-1)
    scale = 2.0
    logits = (scale * a @ b.T).tolist()
    eye = [[1.0 if i == j else 0.0 for j in range(3)] for i in range(3)]
    expected = 0.5 * (_hand_ce(logits, eye) + _hand_ce([list(r) for r in zip(*logits)], eye))
    got = info_nce(a, b, math.log(scale))
    assert got.item() == pytest.approx(expected, rel=1e-9)


def test_info_nce_labels_make_same_class_items_positives():
    a = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]], dtype=torch.float64), dim=-1)
    labels = torch.tensor([3, 3, 5])
    logits = (a @ a.T).tolist()
    targets = [[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]
    expected = _hand_ce(logits, targets)  # symmetric logits: both directions equal
    assert info_nce(a, a, 0.0, labels).item() == pytest.approx(expected, rel=1e-9)
    assert info_nce(a, a, 0.0, labels).item() != pytest.approx(info_nce(a, a, 0.0).item())


def test_cross_modal_loss_terms_and_weights():
    torch.manual_seed(0)
    emb = {m: F.normalize(torch.randn(5, 4, dtype=torch.float64), dim=-1) for m in ("text", "image", "video")}
    s = 1.5
    out = cross_modal_loss(emb, alpha=0.5, beta=2.0, gamma=3.0, logit_scale=math.log(s))

    def d(q, c):  # nce(q -> c)
        return F.cross_entropy(s * emb[q] @ emb[c].T, torch.arange(5)).item()

    l_text = (d("image", "text") + d("video", "text")) / 2
    l_image = (d("text", "image") + d("video", "image")) / 2
    l_video = (d("text", "video") + d("image", "video")) / 2
    assert out.terms["text"].item() == pytest.approx(l_text)
    assert out.terms["image"].item() == pytest.approx(l_image)
    assert out.terms["video"].item() == pytest.approx(l_video)
    assert out.total.item() == pytest.approx(0.5 * l_text + 2.0 * l_image + 3.0 * l_video)
    assert out.pairs["text-image"].item() == pytest.approx(
        info_nce(emb["text"], emb["image"], math.log(s)).item()
    )
    assert set(out.log_dict()) >= {"loss", "loss/text", "loss/image", "loss/video", "pair/image-video"}


def test_missing_modality_trains_on_what_is_there():
    torch.manual_seed(0)
    emb = {"text": F.normalize(torch.randn(4, 3), dim=-1), "image": F.normalize(torch.randn(4, 3), dim=-1)}
    out = cross_modal_loss({**emb, "video": None, "audio": None}, gamma=100.0, delta_audio=100.0)
    assert set(out.terms) == {"text", "image"}
    assert out.total.item() == pytest.approx(out.terms["text"].item() + out.terms["image"].item())
    with pytest.raises(DsMultimodalError, match="at least two modalities"):
        cross_modal_loss({"text": emb["text"], "image": None})
    with pytest.raises(DsMultimodalError, match="unknown modality 'smell'"):
        cross_modal_loss({**emb, "smell": emb["text"]})
