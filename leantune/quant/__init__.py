"""Weight-only quantization of the frozen base (MISSION A1(a); QLoRA-style, arXiv 2305.14314)."""

from leantune.quant.weight_only import (
    QuantizedWeight,
    QuantLinear,
    QuantLoraLinear,
    QuantMergeError,
    QuantStats,
    available_gpu_backend,
    dequantize,
    dequantize_model,
    fake_quantize_model,
    quantize_groupwise,
    quantize_model,
    register_quant_lora,
)

__all__ = [
    "QuantizedWeight",
    "QuantLinear",
    "QuantLoraLinear",
    "QuantMergeError",
    "QuantStats",
    "available_gpu_backend",
    "dequantize",
    "dequantize_model",
    "fake_quantize_model",
    "quantize_groupwise",
    "quantize_model",
    "register_quant_lora",
]
