"""Quantized weights: configs (scheme.py) and formats as pure tensor functions (formats.py)."""

from .formats import Fp8Weight, IntWeight, QuantizedWeight, fuse, read_quantized
from .scheme import QuantScheme, parse_quantization_config, scheme_for_load

__all__ = [
    "Fp8Weight",
    "IntWeight",
    "QuantScheme",
    "QuantizedWeight",
    "fuse",
    "parse_quantization_config",
    "read_quantized",
    "scheme_for_load",
]
