"""Explainer: image(s) in, class activation maps out, from the ONNX file alone.

The walk: preprocess (as the metadata says) -> one onnxruntime call (logits,
probabilities, features, exact gradients for the target; Finer-CAM alone: model.forward.onnx,
its gradients from model.headgrad.onnx) -> the method's weights or map
(runtime/methods.py) -> ReLU -> upsampling to the input size, each cell at the centre of
its receptive field (runtime/placement.py; `placement="naive"`: a plain stretch) -> min-max
normalisation (camkernels).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from explicam import camkernels
from explicam.runtime.images import heatmap_on_photo
from explicam.runtime import placement as _placement
from explicam.runtime.methods import CONSTANT_WEIGHT_METHODS, HEAD_GRAD_METHODS, METHODS, CamInputs, MethodError
from explicam.runtime.methods_input import FEATURE_FREE, INPUT_GRAD_METHODS, input_gradients
from explicam.runtime.model import OnnxModel


# Images per onnxruntime call unless told: with its threads spinning inside a call
# (runtime/model.py), a few images per call run fastest per image. EfficientNet-Lite0 at
# 224 px, 2 cores, 32 images timed in calls of 1, 2, 4, ... 32 images, three rounds: 3.0 ms per
# image in calls of 1 to 4, 3.5 in calls of 16, 3.8 in one of 32; its main graph 3.8 ms at 4
# against 4.3-4.6 at 16-32; the seed and ResNet-50 within 6% of their best from 4 to 32.
CALL_PIXELS = 4 * 224 * 224
# Images per chunk when saliency, SmoothGrad or IG run alone: the chunk's input-gradient calls fill
# the pipelines (methods_input.run_calls), which wait for their last call at each chunk's end
# (saliency of 32 images, interleaved: EfficientNet-Lite0 11.0 ms per image in chunks of 4, 10.7 in
# one; the seed's kernel-4 net at 224 px 8.3 and 7.9)
FEATURE_FREE_PIXELS = 32 * 224 * 224


@dataclass
class Explanation:
    method: str
    cams: np.ndarray           # (N, h, w) float32, after ReLU, not normalised (RISE: (N, H, W), the input's own)
    heatmaps: np.ndarray       # (N, H, W) float32 in [0, 1] at the input size (Explainer.placement)
    logits: np.ndarray         # (N, classes)
    probabilities: np.ndarray  # (N, classes)
    targets: np.ndarray        # (N,) class index explained for each image
    class_names: list
    resize_shorter: int | None = None  # how the photos were fitted to the input (None: squeezed whole)
    notes: dict = field(default_factory=dict)  # per-image figures of the method, {name: (N,)} (IG: completeness)

    def heatmap_on(self, i: int, shape) -> np.ndarray:
        """Image i's heatmap on its photo of `shape` (h, w), through the same resize the
        preprocessing used, so it covers what the model saw and nothing else."""
        return heatmap_on_photo(self.heatmaps[i], shape[:2], self.resize_shorter)

    def top_k(self, k: int = 3) -> list:
        """[(class name, probability), ...] per image, most probable first."""
        order = np.argsort(-self.probabilities, axis=1, kind="stable")[:, :k]
        return [[(self.class_names[j], float(p[j])) for j in row] for p, row in zip(self.probabilities, order)]

    @property
    def target_names(self) -> list:
        return [self.class_names[t] for t in self.targets]


class Explainer:
    """Explanations from an explicam ONNX export, on CPU, without TensorFlow.

    kernels: "auto" (numba when importable), "numba" or "numpy".
    batch_size: images per onnxruntime call; None: as many as make CALL_PIXELS (4 at 224 px).
    Score-CAM and Ablation-CAM run their masked copies at least 32 per call.
    scorecam_topk: None = every channel; k = the k channels of largest variance.
    placement: where heatmap cells are drawn: "geometric" (each at its receptive field's
    centre, the default when the file has geometry), "naive" (plain stretch, the default
    for older exports), or a geometry dict; runtime/placement.py.
    feature_layer: which of the file's feature layers (export --layer a,b,c) single-layer
    methods read: a name, tensor or output name of OnnxModel.feature_layers, or its index;
    None: the primary one, and `layercam` fuses them all.
    options: method options used by every call unless a call passes its own (rise_masks,
    rise_cells, rise_p, rise_seed, finercam_k, finercam_alpha, reciprocam_mask,
    smoothgrad_samples, smoothgrad_noise, ig_steps, ig_baseline, ig_method, layercam_fuse, ...;
    see each method's docstring in runtime/methods.py, methods_perturb.py, methods_input.py).
    """

    def __init__(self, model_path, kernels: str = "auto", threads: int | None = None, batch_size: int | None = None,
                 scorecam_topk: int | None = None, warmup: bool = True, placement=None, options=None,
                 feature_layer=None):
        self.model = OnnxModel(model_path, threads)
        self.layer = self._pick_layer(feature_layer)
        self.feature_layer = feature_layer
        primary = self.layer is self.model.feature_layers[0]
        self.geometry = _placement.model_geometry(self.model.meta) if primary else \
            _placement.model_geometry(self.layer)
        self.effective = _placement.model_effective(self.model.meta) if primary else None
        self.placement = _placement.resolve(placement, self.geometry, self.effective)
        self.k = camkernels.get(kernels)
        self.kernels = kernels if kernels != "auto" else camkernels.BACKEND
        self.batch_size = int(batch_size) if batch_size else max(1, CALL_PIXELS // int(np.prod(self.input_hw)))
        self.scorecam_topk = scorecam_topk
        self.options = dict(options or {})
        self.cache: dict = {}  # what a method computes once per explainer (RISE's masks, runtime/methods_perturb.py)
        if warmup:  # compile the kernels and let onnxruntime allocate now, not on the first frame
            camkernels.warmup(self.k)
            self.explain(np.zeros((1, *self.input_hw, 3), np.uint8), "gradcam")

    def _pick_layer(self, wanted) -> dict:
        layers = self.model.feature_layers
        if wanted is None:
            return layers[0]
        for i, d in enumerate(layers):
            if str(wanted) in (str(i), d.get("name"), d.get("layer"), d.get("features")):
                return d
        raise MethodError(f"no feature layer {wanted!r} in {self.model.path}; it has "
                          + ", ".join(f"{d['name']} ({d['features']})" for d in layers)
                          + ("" if len(layers) > 1 else "; export several with --layer a,b,c"))

    def upsample(self, maps: np.ndarray, layer: dict | None = None) -> np.ndarray:
        """(N, h, w) maps of `layer` (default the explainer's own) -> (N, H, W) at the input,
        under the explainer's placement, not normalised."""
        if layer is None or layer.get("features") == self.layer.get("features"):
            geometry, place = self.geometry, self.placement
        else:   # another layer of the file: its own geometry (the effective fit belongs to the primary)
            geometry = _placement.model_geometry(layer)
            place = "naive" if self.placement == "naive" or geometry is None else "geometric"
        p = _placement.params(place, geometry, self.input_hw, np.shape(maps)[1:3])
        return self.k.upsample_placed(maps, *self.input_hw, *p)

    @property
    def class_names(self) -> list:
        return self.model.class_names

    @property
    def input_size(self) -> int | None:
        """The input side of a square model (None for a non-square one: see input_hw)."""
        return self.model.input_size

    @property
    def input_hw(self) -> tuple:
        return self.model.input_hw

    @property
    def methods(self) -> list:
        """The methods this file offers: the input-gradient ones only where the export wrote
        them (--input-grads; runtime/methods_input.py)."""
        return [m for m in METHODS if self.model.has_input_grads or m not in INPUT_GRAD_METHODS]

    def resolve_targets(self, target, n: int) -> np.ndarray:
        """None -> top-1 (-1); an index or a class name; or one of those per image."""
        items = list(target) if isinstance(target, (list, tuple, np.ndarray)) else [target] * n
        if len(items) != n:
            raise ValueError(f"got {len(items)} targets for {n} images")
        out = np.empty(n, np.int64)
        for i, t in enumerate(items):
            if t is None:
                out[i] = -1
            elif isinstance(t, str) and not t.lstrip("-").isdigit():
                if t not in self.class_names:
                    raise ValueError(f"unknown target class '{t}'; classes: {', '.join(self.class_names)}")
                out[i] = self.class_names.index(t)
            else:
                out[i] = int(t)
                if not 0 <= out[i] < self.model.num_classes:
                    raise ValueError(f"target {int(t)} out of range: the model has {self.model.num_classes} classes")
        return out

    def explain(self, images, method: str = "gradcam", target=None, **options) -> Explanation:
        return self.explain_methods(images, [method], target, **options)[method]

    def explain_methods(self, images, methods, target=None, **options) -> dict:
        """Several methods from one forward pass per batch: {method: Explanation}."""
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise MethodError(f"unknown method '{unknown[0]}'; choose from {', '.join(METHODS)}")
        x = self.model.preprocess(images)
        targets = self.resolve_targets(target, len(x))
        opts = {"batch_size": max(self.batch_size, 32), "scorecam_topk": self.scorecam_topk, **self.options,
                **options}
        parts = {m: [] for m in methods}
        feature_free = self.model.has_input_grads and all(m in FEATURE_FREE for m in methods)
        # Finer-CAM alone at the primary layer: features and logits from model.forward.onnx, the
        # gradients from model.headgrad.onnx; the main graph's own gradient pass would be wasted.
        # Grad-CAM and CAM too where the head's channel means are constant (methods.gradcam)
        head_only = HEAD_GRAD_METHODS | (CONSTANT_WEIGHT_METHODS if self.model.constant_channel_grads else set())
        head_grad = all(m in head_only for m in methods) and self.layer is self.model.feature_layers[0] \
            and self.model.has_head_grads
        piped = feature_free and self.model.workers > 1   # one thread: no pipelines to fill, the usual chunks
        step = max(self.batch_size, FEATURE_FREE_PIXELS // int(np.prod(self.input_hw))) if piped else self.batch_size
        for start in range(0, len(x), step):
            xb, tb = x[start:start + step], targets[start:start + step]
            out = self.model.forward_features(xb) if head_grad else None   # None: an older forward file
            if feature_free:   # saliency, SmoothGrad, IG alone: no feature map (methods_input.FEATURE_FREE)
                out = self._feature_free(xb, tb, "saliency" in methods, opts)
                inputs = CamInputs(None, None, out["logits"], out["target_used"].astype(np.int64), xb, self.model,
                                   self.k, opts, self.cache, [], self.upsample, input_grads=out.get("input_grads"))
            elif out is not None:
                out["target_used"] = np.where(tb < 0, out["logits"].argmax(1), tb)
                inputs = CamInputs(out["features"], None, out["logits"], out["target_used"].astype(np.int64), xb,
                                   self.model, self.k, opts, self.cache, [], self.upsample)
            else:
                out = self.model.run(xb, tb)
                layers = [] if self.feature_layer is not None else \
                    [(d, out[d["features"]], out[d["grads"]]) for d in self.model.feature_layers]
                inputs = CamInputs(out[self.layer["features"]], out[self.layer["grads"]], out["logits"],
                                   out["target_used"].astype(np.int64), xb, self.model, self.k, opts, self.cache,
                                   layers, self.upsample, primary=self.layer is self.model.feature_layers[0],
                                   grads_output=self.layer["grads"])
            for m in methods:
                inputs.notes = {}
                cams = self.cams(m, inputs)
                parts[m].append((cams, out["logits"], out["probabilities"], out["target_used"], inputs.notes))
        return {m: self._finish(m, parts[m]) for m in methods}

    def _feature_free(self, x, targets, gradients: bool, opts) -> dict:
        """logits, probabilities, target_used (and the targets' input gradients when `gradients`)
        without the main graph: one pass of model.inputgrads.onnx, or of the plain classifier."""
        if gradients:
            return input_gradients(self.model, x, targets, batch=opts.get("input_grads_batch"),
                                   pipelines=opts.get("input_grads_pipelines"))
        forward = self.model.forward_session()
        if forward is None:
            return self.model.run(x, targets, ["logits", "probabilities", "target_used"])
        logits, probs = forward.run(["logits", "probabilities"], {self.model.input_name: x})
        return {"logits": logits, "probabilities": probs, "target_used": np.where(targets < 0, logits.argmax(1), targets)}

    def cams(self, method: str, inputs: CamInputs) -> np.ndarray:
        """The method's map at feature resolution, after ReLU: (N, h, w) float32 (a method
        that draws on the input itself, RISE, returns (N, H, W): heatmaps() keeps it as it is)."""
        out = np.asarray(METHODS[method](inputs), np.float32)
        if out.ndim == 2:  # channel weights: the sum and its ReLU in one kernel call
            return self.k.weighted_sum(inputs.features, out, relu=True)
        return self.k.relu(out)

    def heatmaps(self, cams: np.ndarray, placement=None) -> np.ndarray:
        """(N, h, w) maps -> (N, H, W) in [0, 1] at the input size, under `placement`
        (default: the explainer's own)."""
        if tuple(np.shape(cams)[1:3]) == tuple(self.input_hw):   # RISE, input gradients: placed as they are
            return self.k.normalize_minmax(cams)
        place = self.placement if placement is None else _placement.resolve(placement, self.geometry)
        p = _placement.params(place, self.geometry, self.input_hw, np.shape(cams)[1:3])
        return self.k.heatmap_placed(cams, *self.input_hw, *p)

    def _finish(self, method: str, parts: list) -> Explanation:
        # one batch (a frame, a few images): its arrays as they are, no copies
        join = (lambda i: parts[0][i]) if len(parts) == 1 else (lambda i: np.concatenate([p[i] for p in parts]))
        cams = join(0)
        notes = {k: np.concatenate([p[4][k] for p in parts]) for k in (parts[0][4] if len(parts[0]) > 4 else ())}
        return Explanation(method, cams, self.heatmaps(cams), join(1), join(2), np.asarray(join(3), np.int64),
                           self.class_names, self.model.resize_shorter, notes)
