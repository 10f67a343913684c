"""The package version (a leaf: what the capture store and the ONNX bundle stamp on what they write)."""

__version__ = "0.3.0"
