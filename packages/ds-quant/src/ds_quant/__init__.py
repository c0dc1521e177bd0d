"""int8/int4 weight quantization, ONNX export with KV cache and onnxruntime inference.

import ds_quant
model = ds_quant.quantize(model, bits=4, group_size=128)        # QuantLinear swapped in
ds_quant.save_quantized(model, "out/ds-small-int4")              # quant.yaml + MatMulNBits-packed weights
ds_quant.export_directory("out/ds-small-int4", "out/onnx-int4")  # model.onnx with KV cache
ds_quant.OnnxModel("out/onnx-int4").generate([[1, 2, 3]], 16)    # onnxruntime
"""

from ds_quant.__about__ import __version__
from ds_quant.checkpoint import load_quantized, save_quantized
from ds_quant.errors import DsQuantError
from ds_quant.gptq import GPTQConfig
from ds_quant.onnx import OnnxModel
from ds_quant.onnx_export import export_directory, export_onnx
from ds_quant.packing import PackedWeight, dequantize_weight, quantize_weight
from ds_quant.quant_linear import QuantEmbedding, QuantLinear, set_backend
from ds_quant.quantize import QuantConfig, quantize

__all__ = [
    "DsQuantError",
    "GPTQConfig",
    "OnnxModel",
    "PackedWeight",
    "QuantConfig",
    "QuantEmbedding",
    "QuantLinear",
    "__version__",
    "dequantize_weight",
    "export_directory",
    "export_onnx",
    "load_quantized",
    "quantize",
    "quantize_weight",
    "save_quantized",
    "set_backend",
]
