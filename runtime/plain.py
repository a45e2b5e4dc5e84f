"""RISE for an ONNX classifier explicam never exported: `explain --model any.onnx --method rise`.

RISE (runtime/methods_perturb.py) needs nothing but class probabilities for masked images,
so a classifier `export` cannot instrument (an op the autodiff has no rule for, a graph
whose feature map cannot be found) can still be explained, as it is. The preprocessing is
what the command line says (the options of `export`: --scale --mean --std --channels
--layout --input-size --resize-shorter), applied here in numpy (runtime/preprocess.py), not
in the graph:

    photo -> resized to the input as an export would (--resize-shorter: shorter side, then
    the centre) -> RGB in [0, 1]: where RISE's masks apply (0: black) -> (pixel * scale -
    mean) / std, channels, layout -> the file's input -> its output -> probabilities

The file's output is taken as probabilities when it ends in a Softmax (or its values are
non-negative and sum to 1), as log-probabilities after a LogSoftmax, as independent
scores after a Sigmoid; anything else is logits, and gets a softmax.
"""
from __future__ import annotations

import os

import numpy as np

from explicam import camkernels
from explicam.runtime.explainer import Explainer
from explicam.runtime.methods import METHODS, CamInputs, MethodError
from explicam.runtime.model import ModelError, NotExported, OnnxModel, _session
from explicam.runtime.preprocess import Preprocess

PLAIN_METHODS = ("rise",)


def _dims(value) -> list:
    return [d if isinstance(d, int) and d > 0 else None for d in value.shape]


def _final_op(path: str, output: str) -> str | None:
    """The op type that produces `output` (through Identity), read with onnx when it is
    installed (the train extra); None without it."""
    try:
        import onnx
    except ImportError:
        return None
    try:
        graph = onnx.load(path, load_external_data=False).graph
    except Exception:  # noqa: BLE001  (onnxruntime loaded it; a reader's quirk must not stop RISE)
        return None
    producer = {o: n for n in graph.node for o in n.output}
    name = output
    while name in producer and producer[name].op_type == "Identity":
        name = producer[name].input[0]
    return producer[name].op_type if name in producer else None


class PlainModel:
    """An ONNX image classifier as it is, with the surface of OnnxModel that RISE needs:
    preprocess (photos -> RGB [0, 1] at the input size), probabilities (of such inputs),
    class_names, input_hw; no features, no gradients, no head."""

    # photos reach the input exactly as for an export: one implementation (runtime/model.py)
    preprocess = OnnxModel.preprocess
    fit = OnnxModel.fit
    on_photo = OnnxModel.on_photo
    num_classes = OnnxModel.num_classes

    def __init__(self, path, pre: Preprocess | None = None, input_hw=None, layout: str = "auto",
                 resize_shorter: int | None = None, threads: int | None = None):
        self.path = os.fspath(path)
        self.threads = threads
        self.session = _session(self.path, threads)
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4 or inputs[0].type != "tensor(float)":
            listed = ", ".join(f"{i.name} {i.type} {list(i.shape)}" for i in inputs)
            raise ModelError(f"{self.path}: RISE feeds one 4-D float32 image input; this file's inputs: {listed}")
        self.input_name, dims = inputs[0].name, _dims(inputs[0])
        self.layout = self._layout(dims, layout)
        spatial = dims[2:4] if self.layout == "nchw" else dims[1:3]
        channels = dims[1] if self.layout == "nchw" else dims[3]
        self.input_hw = self._size(spatial, input_hw)
        self.input_size = self.input_hw[0] if self.input_hw[0] == self.input_hw[1] else None
        self.pre = Preprocess(**{**(pre or Preprocess()).__dict__, "layout": self.layout})
        try:
            self.pre.check(channels if channels is not None else (1 if self.pre.channels == "gray" else 3))
        except ValueError as exc:
            raise ModelError(f"{self.path}: {exc}") from None
        self.max_batch = 1 if dims[0] == 1 else None  # a file exported with batch 1 runs one image per call
        self.output = self._output()
        self.resize_shorter = int(resize_shorter) if resize_shorter else None
        self.value_range = (0.0, 1.0)
        self.meta = {"plain": True}  # no explicam metadata: no geometry, no head
        self.head_kind, self.kernel, self.feature_shape = "other", None, None
        first = self.scores(np.full((1, *self.input_hw, 3), 0.5, np.float32))
        if first.ndim != 2:
            raise ModelError(f"{self.path}: output '{self.output}' has shape {list(first.shape)}; RISE needs "
                             "(N, classes) scores")
        self.class_names = [f"class_{i}" for i in range(first.shape[1])]
        self.score_kind = self._score_kind(first)

    def _layout(self, dims, layout: str) -> str:
        if layout in ("nchw", "nhwc"):
            return layout
        first, last = dims[1] in (1, 3), dims[3] in (1, 3)
        if first != last:
            return "nchw" if first else "nhwc"
        raise ModelError(f"{self.path}: cannot tell the layout of input '{self.input_name}' {dims}; "
                         "pass --layout nchw or nhwc")

    def _size(self, spatial, input_hw) -> tuple:
        if input_hw is not None:
            hw = (int(input_hw[0]), int(input_hw[1]))
            if any(s is not None and s != v for s, v in zip(spatial, hw)):
                raise ModelError(f"{self.path}: --input-size {hw[0]},{hw[1]} but the file's input is "
                                 f"{spatial[0]}x{spatial[1]}")
            return hw
        if None in spatial:
            raise ModelError(f"{self.path}: the input's spatial size is dynamic; pass --input-size H,W")
        return int(spatial[0]), int(spatial[1])

    def _output(self) -> str:
        outs = self.session.get_outputs()
        if len(outs) == 1:
            return outs[0].name
        two_d = [o for o in outs if len(o.shape) == 2]
        if len(two_d) == 1:
            return two_d[0].name
        raise ModelError(f"{self.path}: {len(outs)} outputs ({', '.join(o.name for o in outs)}) and not one "
                         "(N, classes) among them; export a file with the class scores as its only output")

    def _score_kind(self, sample: np.ndarray) -> str:
        op = _final_op(self.path, self.output)
        if op in ("Softmax", "LogSoftmax", "Sigmoid"):
            return {"Softmax": "probabilities", "LogSoftmax": "log-probabilities", "Sigmoid": "sigmoid"}[op]
        rng = np.random.default_rng(0)
        s = np.concatenate([sample, self.scores(rng.random((2, *self.input_hw, 3), dtype=np.float32))])
        if (s >= 0).all() and np.allclose(s.sum(axis=1), 1, atol=1e-4):
            return "probabilities"
        if (s <= 0).all() and np.allclose(np.exp(s).sum(axis=1), 1, atol=1e-4):
            return "log-probabilities"
        return "logits"

    def scores(self, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """The file's output for preprocessed inputs (N, H, W, 3) RGB in [0, 1]."""
        step = self.max_batch or max(1, int(batch_size))
        out = [self.session.run([self.output], {self.input_name: self.pre.numpy(x[i:i + step])})[0]
               for i in range(0, len(x), step)]
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, 0), np.float32)

    def to_probabilities(self, scores: np.ndarray) -> np.ndarray:
        if self.score_kind in ("probabilities", "sigmoid"):
            return scores
        if self.score_kind == "log-probabilities":
            return np.exp(scores)
        z = scores - scores.max(axis=1, keepdims=True)
        e = np.exp(z)
        return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)

    def probabilities(self, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Class probabilities for many preprocessed inputs (RISE's masked images)."""
        return self.to_probabilities(self.scores(x, batch_size))


class PlainExplainer(Explainer):
    """An Explainer over a PlainModel: only RISE; any other method says to export first."""

    def __init__(self, model_path, kernels: str = "auto", threads: int | None = None, batch_size: int | None = None,
                 scorecam_topk: int | None = None, warmup: bool = True, placement=None, options=None,
                 preprocess: Preprocess | None = None, input_hw=None, layout: str = "auto",
                 resize_shorter: int | None = None):
        self.model = PlainModel(model_path, preprocess, input_hw, layout, resize_shorter, threads)
        self.geometry = None
        self.placement = "naive"  # RISE draws on the input itself: no placement moves its map
        self.k = camkernels.get(kernels)
        self.kernels = kernels if kernels != "auto" else camkernels.BACKEND
        self.batch_size = int(batch_size or 16)
        self.scorecam_topk = scorecam_topk
        self.options = dict(options or {})
        self.cache: dict = {}
        if warmup:
            camkernels.warmup(self.k)
            self.model.probabilities(np.zeros((1, *self.input_hw, 3), np.float32))

    @property
    def methods(self) -> list:
        return list(PLAIN_METHODS)

    def explain_methods(self, images, methods, target=None, **options) -> dict:
        other = [m for m in methods if m not in PLAIN_METHODS]
        if other:
            known = other[0] in METHODS
            raise MethodError(f"{self.model.path} is a plain classifier (not exported by explicam): it offers "
                              f"only {', '.join(PLAIN_METHODS)}; " + (
                                  f"for {other[0]}, export it first: python cli.py export --model {self.model.path}"
                                  if known else f"unknown method '{other[0]}'"))
        x = self.model.preprocess(images)
        targets = self.resolve_targets(target, len(x))
        opts = {"batch_size": max(self.batch_size, 32), **self.options, **options}
        parts = {m: [] for m in methods}
        for start in range(0, len(x), self.batch_size):
            xb, tb = x[start:start + self.batch_size], targets[start:start + self.batch_size]
            raw = self.model.scores(xb, self.batch_size)
            probs = self.model.to_probabilities(raw)
            used = np.where(tb < 0, probs.argmax(axis=1), tb).astype(np.int64)
            inputs = CamInputs(None, None, raw, used, xb, self.model, self.k, opts, self.cache)
            for m in methods:
                parts[m].append((self.cams(m, inputs), raw, probs, used))
        return {m: self._finish(m, parts[m]) for m in methods}


def open_explainer(model_path, preprocess: dict | None = None, **kw) -> Explainer:
    """An Explainer for an explicam export; for any other loadable ONNX classifier a
    PlainExplainer (RISE only) with `preprocess` = {preprocess: Preprocess, input_hw,
    layout, resize_shorter} (the command line's options). Giving those for an export is an
    error: its preprocessing is in its metadata."""
    try:
        ex = Explainer(model_path, **kw)
    except NotExported:
        return PlainExplainer(model_path, **kw, **(preprocess or {}))
    if preprocess:
        raise ValueError(f"{model_path} is an explicam export: its preprocessing is in its metadata; "
                         "--scale, --mean, --std, --channels, --layout, --input-size and --resize-shorter are for "
                         "ONNX classifiers explicam did not export (RISE)")
    return ex
