import pytest
import torch

from ds_multimodal.data import load_digits_multimodal
from ds_multimodal.encoders import EncoderConfig
from ds_multimodal.model import AlignerConfig, MultimodalAligner


@pytest.fixture(scope="session")
def tiny_encoder_config():
    return EncoderConfig(embed_dim=32, hidden_dim=32, n_layers=1, n_heads=2)


@pytest.fixture(scope="session")
def calib_split(tmp_path_factory):
    """The 180-item calibration split (audio synthesised into a per-session cache when espeak-ng exists)."""
    return load_digits_multimodal("calibration", cache_dir=tmp_path_factory.mktemp("mm-cache"))


@pytest.fixture
def tiny_model(tiny_encoder_config, calib_split):
    torch.manual_seed(0)
    return MultimodalAligner(AlignerConfig(encoder=tiny_encoder_config, audio=calib_split.audio is not None))


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """The models here are tiny: one intra-op thread is faster, and far faster on a busy CPU (see
    TrainConfig.num_threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
