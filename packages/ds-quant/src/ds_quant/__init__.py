"""int8/int4 weight quantization, ONNX export with KV cache and onnxruntime inference."""

from ds_quant.__about__ import __version__

__all__ = ["__version__"]
