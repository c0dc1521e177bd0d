"""Text, image, video and audio encoders, cross-modal attention calibration and a weighted cross-modal loss."""

from ds_multimodal.__about__ import __version__
from ds_multimodal.calibration import CrossModalCalibration
from ds_multimodal.data import CLASS_CAPTIONS, DigitsDataset, audio_status, load_digits_multimodal
from ds_multimodal.encoders import AudioEncoder, EncoderConfig, ImageEncoder, TextEncoder, VideoEncoder
from ds_multimodal.errors import DsMultimodalError
from ds_multimodal.losses import cross_modal_loss, info_nce
from ds_multimodal.model import AlignerConfig, MultimodalAligner, embed
from ds_multimodal.retrieval import evaluate, expected_calibration_error, format_table, recall_at_k, retrieve
from ds_multimodal.train import TrainConfig, fit_calibration, train

__all__ = [
    "CLASS_CAPTIONS",
    "AlignerConfig",
    "AudioEncoder",
    "CrossModalCalibration",
    "DigitsDataset",
    "DsMultimodalError",
    "EncoderConfig",
    "ImageEncoder",
    "MultimodalAligner",
    "TextEncoder",
    "TrainConfig",
    "VideoEncoder",
    "__version__",
    "audio_status",
    "cross_modal_loss",
    "embed",
    "evaluate",
    "expected_calibration_error",
    "fit_calibration",
    "format_table",
    "info_nce",
    "load_digits_multimodal",
    "recall_at_k",
    "retrieve",
    "train",
]
