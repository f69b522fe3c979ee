"""qlp-compress: find per-layer sparsities with deep Q-learning (QLP), prune, fine-tune, export ONNX."""

__version__ = "0.1.0"
