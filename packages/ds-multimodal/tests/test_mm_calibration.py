import pytest
import torch
import torch.nn.functional as F

from ds_multimodal import CrossModalCalibration, expected_calibration_error, recall_at_k, retrieve


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x_tok = torch.randn(3, 5, 8, generator=g)
    t_tok = torch.randn(4, 6, 8, generator=g)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[0, :2] = False
    return F.normalize(x_tok.mean(1), dim=-1), x_tok, F.normalize(t_tok.mean(1), dim=-1), t_tok, mask


def test_gate_and_temperature_get_gradients():
    cal = CrossModalCalibration(8, n_heads=2)
    logits = cal.text_logits("image", *_inputs())
    assert logits.shape == (3, 4)
    F.cross_entropy(logits, torch.tensor([0, 1, 2])).backward()
    assert cal.gate["image"].grad is not None and cal.gate["image"].grad.abs().item() > 0
    assert cal.log_inv_temperature["image-text"].grad.abs().item() > 0
    assert cal.gate["video"].grad is None  # other modalities untouched
    # the gate starts closed (tanh(0) = 0), so the attention learns only once the gate has opened
    assert cal.attn["image"].in_proj_weight.grad.abs().sum().item() == 0
    cal.zero_grad()
    with torch.no_grad():
        cal.gate["image"].fill_(0.5)
    F.cross_entropy(cal.text_logits("image", *_inputs()), torch.tensor([0, 1, 2])).backward()
    assert cal.attn["image"].in_proj_weight.grad.abs().sum().item() > 0


def test_closed_gate_is_scaled_cosine_and_open_gate_changes_scores():
    cal = CrossModalCalibration(8, n_heads=2)
    x_emb, x_tok, t_emb, t_tok, mask = _inputs()
    with torch.no_grad():
        cal.log_inv_temperature["image-text"].fill_(torch.log(torch.tensor(5.0)))
        closed = cal.text_logits("image", x_emb, x_tok, t_emb, t_tok, mask)
        torch.testing.assert_close(closed, 5.0 * x_emb @ t_emb.T)
        cal.gate["image"].fill_(2.0)
        opened = cal.text_logits("image", x_emb, x_tok, t_emb, t_tok, mask)
    assert not torch.allclose(opened, closed)
    # padded text tokens are ignored: changing them leaves the scores alone
    t_tok2 = t_tok.clone()
    t_tok2[0, :2] = 100.0
    with torch.no_grad():
        torch.testing.assert_close(cal.text_logits("image", x_emb, x_tok, t_emb, t_tok2, mask), opened)


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
