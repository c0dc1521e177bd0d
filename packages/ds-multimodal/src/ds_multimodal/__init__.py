"""Text, image, video and audio encoders, cross-modal attention calibration and a weighted cross-modal loss."""

from ds_multimodal.__about__ import __version__

__all__ = ["__version__"]
