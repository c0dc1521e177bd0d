import pytest
import torch

from ds_models import ModelConfig, Transformer
from ds_multimodal import CLASS_CAPTIONS, audio_status, load_digits_multimodal
from ds_multimodal.encoders import TextEncoder, mel_filterbank, tokenize


def test_embedding_shapes_and_norms(tiny_model, calib_split):
    d = calib_split
    given = {"text": d.captions[:3], "image": d.images[:3], "video": d.videos[:3]}
    if d.audio is not None:
        given["audio"] = d.audio[:3]
    for m, v in given.items():
        emb, tokens, mask = tiny_model.encode(m, v)
        assert emb.shape == (3, 32), m
        torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
        assert tokens.shape[0] == 3 and tokens.shape[2] == 32 and mask.shape == tokens.shape[:2]
    assert tiny_model.encode("image", d.images[:2])[1].shape == (2, 16, 32)  # 16 patches of 4x4
    assert tiny_model.encode("video", d.videos[:2])[1].shape == (
        2,
        d.videos.shape[1],
        32,
    )  # one token per frame


def test_tokenize_left_pads_and_masks():
    ids, mask = tokenize(["ab", "abcd"], max_len=16)
    assert ids.tolist() == [[0, 0, ord("a") + 1, ord("b") + 1], [ord(c) + 1 for c in "abcd"]]
    assert mask.tolist() == [[False, False, True, True], [True] * 4]


def test_text_padding_does_not_change_embedding(tiny_model):
    tiny_model.eval()
    with torch.no_grad():
        alone = tiny_model.encode("text", ["seven"])[0]
        padded = tiny_model.encode("text", ["seven", "a much longer caption here"])[0][:1]
    torch.testing.assert_close(alone, padded, atol=1e-5, rtol=1e-5)


def test_pretrained_text_backbone_is_used(tiny_encoder_config):
    backbone = Transformer(
        ModelConfig(vocab_size=300, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=64)
    )
    enc = TextEncoder(tiny_encoder_config, backbone=backbone)
    assert enc.backbone is backbone
    before = enc(["the digit one"])[0].detach()
    with torch.no_grad():
        backbone.embed_tokens.weight.mul_(3.0).add_(1.0)
    assert not torch.allclose(before, enc(["the digit one"])[0])


def test_mel_filterbank_is_triangular_partition():
    fb = mel_filterbank(40, 400, 16000)
    assert fb.shape == (201, 40)
    assert (fb >= 0).all() and fb.max() <= 1.0 + 1e-6
    # inside the covered band consecutive triangles overlap so each bin's weights sum to ~1
    inner = fb.sum(1)[2:187]
    torch.testing.assert_close(inner, torch.ones_like(inner), atol=1e-4, rtol=0)
    peaks = fb.argmax(0)
    assert (peaks[1:] > peaks[:-1]).all() and (fb.sum(0) > 0).all()  # ordered, none empty


def test_dataset_is_deterministic_and_consistent(calib_split):
    again = load_digits_multimodal("calibration", audio=False)
    assert again.captions == calib_split.captions
    torch.testing.assert_close(again.images, calib_split.images)
    torch.testing.assert_close(again.videos, calib_split.videos)
    assert len(calib_split) == 180 and again.audio is None
    words = [w.split()[-1] for w in CLASS_CAPTIONS]
    for caption, label in zip(calib_split.captions, calib_split.labels.tolist()):
        assert words[label] in caption.split()
    # a video's frames are the digit moving: consecutive frames differ, total ink is conserved
    v = calib_split.videos[0]
    assert not torch.allclose(v[0], v[-1])
    torch.testing.assert_close(v[0].sum(), v[-1].sum())


@pytest.mark.skipif(not audio_status()[0], reason="espeak-ng not installed")
def test_spoken_digits_are_real_audio(calib_split):
    a = calib_split.audio
    assert a.shape == (180, 16000)
    assert (a.abs().amax(1) > 0.01).all()  # nothing silent
    # two renditions of different words differ
    i, j = 0, int((calib_split.labels != calib_split.labels[0]).nonzero()[0])
    assert not torch.allclose(a[i], a[j])


def test_audio_unavailable_is_reported(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    ok, reason = audio_status()
    assert not ok and "espeak-ng" in reason
    d = load_digits_multimodal("calibration")
    assert d.audio is None and "espeak-ng" in d.audio_reason
