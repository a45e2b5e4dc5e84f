"""Training side of explicam (needs the `train` extra: TensorFlow)."""
