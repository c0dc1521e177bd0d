import math

import pytest
import torch
import torch.nn.functional as F

from ds_multimodal import CrossModalCalibration, expected_calibration_error, recall_at_k, retrieve
from ds_multimodal.calibration import class_probs
from ds_multimodal.train import _fit_log_scale


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x_tok = torch.randn(3, 5, 8, generator=g)
    t_tok = torch.randn(4, 6, 8, generator=g)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[0, :2] = False
    return F.normalize(x_tok.mean(1), dim=-1), x_tok, F.normalize(t_tok.mean(1), dim=-1), t_tok, mask


def test_gate_and_scale_get_gradients():
    cal = CrossModalCalibration(8, n_heads=2)
    base = torch.tensor(math.log(10.0))
    logits = cal.text_logits("image", *_inputs(), logit_scale=base)
    assert logits.shape == (3, 4)
    F.cross_entropy(logits, torch.tensor([0, 1, 2])).backward()
    assert cal.gate["image"].grad is not None and cal.gate["image"].grad.abs().item() > 0
    assert cal.log_scale["image-text"].grad.abs().item() > 0
    assert cal.gate["video"].grad is None  # other modalities untouched
    # the gate starts closed (tanh(0) = 0), so the attention learns only once the gate has opened
    assert cal.attn["image"].in_proj_weight.grad.abs().sum().item() == 0
    cal.zero_grad()
    with torch.no_grad():
        cal.gate["image"].fill_(0.5)
    F.cross_entropy(
        cal.text_logits("image", *_inputs(), logit_scale=base), torch.tensor([0, 1, 2])
    ).backward()
    assert cal.attn["image"].in_proj_weight.grad.abs().sum().item() > 0


def test_unfitted_module_is_identity_and_open_gate_changes_scores():
    cal = CrossModalCalibration(8, n_heads=2).eval()
    x_emb, x_tok, t_emb, t_tok, mask = _inputs()
    base = torch.tensor(math.log(5.0))
    with torch.no_grad():
        torch.testing.assert_close(
            cal.text_logits("image", x_emb, x_tok, t_emb, t_tok, mask, logit_scale=base),
            5.0 * x_emb @ t_emb.T,
        )
        torch.testing.assert_close(
            cal.pair_logits("image", "video", x_emb, t_emb, base), 5.0 * x_emb @ t_emb.T
        )
        cal.log_scale["image-text"].fill_(math.log(2.0))  # factor 2 on the trained scale
        closed = cal.text_logits("image", x_emb, x_tok, t_emb, t_tok, mask, logit_scale=base)
        torch.testing.assert_close(closed, 10.0 * x_emb @ t_emb.T)
        cal.gate["image"].fill_(2.0)
        opened = cal.text_logits("image", x_emb, x_tok, t_emb, t_tok, mask, logit_scale=base)
    assert not torch.allclose(opened, closed)
    # padded text tokens are ignored: changing them leaves the scores alone
    t_tok2 = t_tok.clone()
    t_tok2[0, :2] = 100.0
    with torch.no_grad():
        again = cal.text_logits("image", x_emb, x_tok, t_emb, t_tok2, mask, logit_scale=base)
    torch.testing.assert_close(again, opened)


def test_class_probs_sum_gallery_mass_per_digit():
    logits = torch.log(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))  # softmax = [.1, .2, .3, .4]
    probs = class_probs(logits, torch.tensor([2, 0, 2, 1]), n_classes=3)
    torch.testing.assert_close(probs, torch.tensor([[0.2, 0.4, 0.4]]))


def test_scale_fit_reduces_held_out_ece_of_a_miscalibrated_scorer():
    """Scores whose true scale is 4x the trained one: the fitted factor recovers it from one sample
    and lowers ECE on an independent held-out sample (what fit_calibration does per pair)."""
    g = torch.Generator().manual_seed(0)
    true_scale, trained_scale, n_classes = 20.0, 5.0, 10

    def sample(n):  # gallery: 3 items per digit; labels drawn from the true retrieval distribution
        gallery = torch.arange(n_classes).repeat(3)
        cos = torch.rand(n, len(gallery), generator=g) * 0.5
        cos[torch.arange(n), torch.randint(len(gallery), (n,), generator=g)] += 0.2  # some confident rows
        p = class_probs(true_scale * cos, gallery, n_classes)
        labels = torch.multinomial(p, 1, generator=g)[:, 0]
        return cos, gallery, labels

    fit_cos, fit_gallery, fit_labels = sample(400)
    t = _fit_log_scale([(fit_cos, fit_gallery, fit_labels)], torch.tensor(math.log(trained_scale)))
    assert trained_scale * math.exp(t) == pytest.approx(true_scale, rel=0.2)
    cos, gallery, labels = sample(2000)
    off = expected_calibration_error(class_probs(trained_scale * cos, gallery), labels)
    on = expected_calibration_error(class_probs(trained_scale * math.exp(t) * cos, gallery), labels)
    assert on < 0.5 * off and off > 0.1, (off, on)


def test_ece_and_recall_hand_computed():
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.45, 0.55]])
    labels = torch.tensor([0, 1, 1, 0])
    # bins (15 equal): 0.9 -> acc 1; 0.8 -> acc 0; 0.7 -> acc 1; 0.55 -> acc 0 (each alone in its bin)
    expected = (abs(1 - 0.9) + abs(0 - 0.8) + abs(1 - 0.7) + abs(0 - 0.55)) / 4
    assert expected_calibration_error(probs, labels) == pytest.approx(expected, abs=1e-6)
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.3, 0.1]])
    q, g = torch.tensor([7, 4]), torch.tensor([1, 4, 7])
    assert recall_at_k(scores, q, g, 1) == pytest.approx(0.5)  # query 0's best is label 1; query 1's is 4
    assert recall_at_k(scores, q, g, 2) == pytest.approx(1.0)
    vals, idx = retrieve(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0], [2.0, 0.0], [1.0, 1.0]]), k=2)
    assert idx.tolist() == [[1, 2]] and vals[0, 0].item() == pytest.approx(1.0)
