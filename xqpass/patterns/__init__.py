"""Dequantize -> matmul patterns (declared once, as data, in :mod:`.catalogue`) and their machinery."""
from .catalogue import PRODUCT_FORMS, WEIGHT_FORMS

__all__ = ["PRODUCT_FORMS", "WEIGHT_FORMS"]
