"""explicam: show why a convolutional network decided what it did, on the device where it runs.

    from explicam import Explainer
    ex = Explainer("runs/k4/model.onnx")        # everything it needs comes from the file's metadata
    res = ex.explain(images, method="gradcam")  # an Explanation: cams, heatmaps, top_k(), ...

The one import root of the installed package. Its parts live in the repository's visible
folders, mapped here by pyproject.toml: explicam.runtime (runtime/: the edge explainer),
explicam.camkernels (camkernels/), explicam.export (export/), explicam.train (train/),
explicam.evaluate (evaluate/) and explicam.cli (the command group). Importing explicam
loads nothing heavy: Explainer and Explanation are imported on first use, so a board with
only the runtime installed never sees TensorFlow.
"""
__version__ = "0.2.0"
__all__ = ["Explainer", "Explanation", "__version__"]


def __getattr__(name):
    if name in ("Explainer", "Explanation"):
        from explicam.runtime import explainer
        return getattr(explainer, name)
    raise AttributeError(f"module 'explicam' has no attribute {name!r}")
