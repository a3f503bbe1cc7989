"""Degradation operators: exact linear maps with true adjoints and pseudo-inverses (pure PyTorch).

This package never imports ComfyUI (enforced by ruff's banned-api rule).
"""
