"""Independent reference implementations for the nnethics test suite.

Everything here uses only plain PyTorch forward hooks on Hugging Face
transformers models: no nnsight and no imports from ``nnethics``.
"""
