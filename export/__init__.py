"""Keras -> ONNX export with features, exact gradients, head graph and metadata (needs the train extra)."""
