"""The CAM methods. Each one is a small function that receives what one forward pass
produced (`CamInputs`) and returns either

  channel weights (N, C): the explainer forms ReLU(sum_k w_k A_k), or
  a map (N, h, w): the explainer applies the ReLU,

in the manner of pytorch-grad-cam's get_cam_weights. The plumbing (preprocessing,
the onnxruntime call, targets, upsampling, normalisation) lives in explainer.py.

Adding a method: write one function here and decorate it with @register("name").
Per-pixel loops go through `a.k`, the camkernels namespace (numba or numpy twins).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

METHODS: dict = {}


def register(name: str):
    def add(fn):
        METHODS[name] = fn
        return fn
    return add


class MethodError(ValueError):
    pass


@dataclass
class CamInputs:
    features: np.ndarray       # (N, h, w, C) conv4 activations A
    grads: np.ndarray | None   # (N, h, w, C) d y^c / d A for each image's target c (pre-softmax score)
    logits: np.ndarray         # (N, classes)
    targets: np.ndarray        # (N,) class explained per image
    inputs: np.ndarray         # (N, S, S, 3) the preprocessed images
    model: object              # runtime.model.OnnxModel, for methods that re-run the network
    k: object                  # camkernels namespace
    options: dict = field(default_factory=dict)
    cache: dict = field(default_factory=dict)  # the Explainer's own: what a method computes once (RISE's masks)
    # every feature layer of the file, [(layer dict of OnnxModel.feature_layers, features, grads)], when
    # no single one was chosen (multi-layer Layer-CAM fuses them; runtime/methods_input.py)
    layers: list = field(default_factory=list)
    upsample: object = None    # fn(maps (N, h, w), layer dict or None) -> (N, H, W), the explainer's placement
    notes: dict = field(default_factory=dict)  # per-image figures a method reports ({name: (N,)}: IG completeness)
    input_grads: np.ndarray | None = None  # (N, H, W, 3) d score / d image of the targets, when already computed
    primary: bool = True       # features/grads are the file's primary layer (the one its side files read)
    grads_output: str = "grads"  # model.onnx's output that holds `grads` (features_1's are grads_1 ...)


@register("cam")
def cam(a: CamInputs):
    """CAM (Zhou et al., "Learning Deep Features for Discriminative Localization", CVPR 2016):
    M_c = sum_k w_k^c A_k with w^c the Dense weights after global average pooling. With
    that head, d y^c / d A_ij^k = w_k^c / (h w) at every position, so the summed gradient
    is exactly w_k^c. Defined only for the GAP head."""
    if a.model.head_kind != "gap":
        raise MethodError("method 'cam' needs a global-average-pooling head (Zhou 2016); this model has the "
                          f"'{a.model.head_kind}' head: train with --head gap, or use gradcam")
    h, w = a.features.shape[1:3]
    return gradcam(a) * np.float32(h * w)


@register("gradcam")
def gradcam(a: CamInputs):
    """Grad-CAM (Selvaraju et al., ICCV 2017): w_k^c = mean_ij d y^c / d A_ij^k.
    `a.grads` is None when the explainer skipped the gradient pass because the head's channel
    means are constant (pooling and linear layers): w^c is then row c of that one matrix."""
    if a.grads is None:
        return a.model.channel_grad_rows(a.targets, a.features)
    return a.k.channel_mean(a.grads)


@register("gradcam++")
def gradcam_plus_plus(a: CamInputs):
    """Grad-CAM++ (Chattopadhay et al., WACV 2018, eq. 19 with the exponential score):
    alpha = g^2 / (2 g^2 + sum_ab A_ab g^3), w_k = sum_ij alpha_ij relu(g_ij)."""
    return a.k.gradcampp_weights(a.features, a.grads)


@register("xgradcam")
def xgradcam(a: CamInputs):
    """XGrad-CAM (Fu et al., BMVC 2020): w_k = sum_ij (A_ij^k / sum_ab A_ab^k) g_ij^k."""
    return a.k.xgradcam_weights(a.features, a.grads)


@register("hirescam")
def hirescam(a: CamInputs):
    """HiResCAM (Draelos & Carin, 2020): the element-wise product sum_k g^k * A^k, no averaging."""
    return a.k.grad_product_sum(a.features, a.grads, False)


@register("layercam")
def layercam(a: CamInputs):
    """Layer-CAM (Jiang et al., IEEE TIP 2021): sum_k relu(g^k) * A^k, position by position.
    With several feature layers in the file (export --layer a,b,c) and none chosen, their maps
    are fused at the input's resolution as the paper does (methods_input.layercam_fused)."""
    if len(a.layers) > 1:
        from explicam.runtime.methods_input import layercam_fused

        return layercam_fused(a)
    return a.k.grad_product_sum(a.features, a.grads, True)


# methods that need the features and logits alone, their gradients from model.headgrad.onnx: alone
# (at the primary layer), they skip the main graph for model.forward.onnx (runtime/explainer.py);
# the second set does too where the head's channel-mean gradients are constant (channel_grad_rows)
HEAD_GRAD_METHODS = {"finercam"}
CONSTANT_WEIGHT_METHODS = {"cam", "gradcam"}


@register("finercam")
def finercam(a: CamInputs):
    """Finer-CAM (Zhang et al., "Finer-CAM: Spotting the Difference Reveals Finer Details for
    Visual Explanation", CVPR 2025), Grad-CAM weighting of the comparison score as the
    authors' code builds it (FinerWeightedTarget, FinerCAM with GradCAM, github.com/Imageomics/Finer-CAM):

        S = sum_d p_d (y_c - alpha y_d) / (sum_d p_d + 1e-9),   w_k = mean_ij d S / d A_ij^k

    over the `finercam_k` reference classes d whose logits are nearest the target's (default
    3: the authors' second to fourth most similar), p = softmax of the logits, `finercam_alpha`
    the comparison strength (default 1; 0 is Grad-CAM). The p_d are taken as constants, so
    d S / d A is a sum of k + 1 class gradients; the authors differentiate through them too,
    which would need every class's gradient (with finercam_k=1 they agree: the one weight
    p / (p + 1e-9) is constant to within 1e-9 / p).
    Gradients are linear in the seed: one pass of the head's gradient graph seeded with S
    (model.headgrad.onnx) gives d S / d A; an export without that file runs the main graph
    once more per reference class (all images and references in one batch). Where the head's
    channel-mean gradients are constant (pooling and linear layers, export: head_channel_grads),
    w is that combination of their rows (OnnxModel.channel_grad_rows): no gradient pass at all.
    `a.grads` may be None (the explainer ran model.forward.onnx alone): the target's gradient
    then comes from the head's graph too, or from the main graph where it is missing."""
    n = len(a.targets)
    k = max(0, min(int(a.options.get("finercam_k", 3)), a.logits.shape[1] - 1))
    alpha = float(a.options.get("finercam_alpha", 1.0))
    constant = a.primary and a.model.constant_channel_grads
    if k == 0:  # a one-class model has nothing to compare with
        if constant:
            return a.model.channel_grad_rows(a.targets, a.features)
        grads = None if a.grads is not None or not a.primary else \
            a.model.head_grads(a.features, (a.targets[:, None], np.ones((n, 1))))
        return a.k.channel_mean(grads if grads is not None else _target_grads(a))
    # the target and its k references, their weights w and the seed [sum w, -alpha w] (one kernel call)
    classes, w, weights = a.k.finer_seed(a.logits, a.targets, k, alpha)
    refs = classes[:, 1:]
    if a.primary:   # one pass of model.headgrad.onnx, seeded with S itself: k + 1 classes per image
        if constant:   # w_k is the same combination of the classes' constant channel means
            rows = a.model.channel_grad_rows(classes, a.features).reshape(n, k + 1, -1)
            return np.einsum("nk,nkc->nc", weights, rows).astype(np.float32)
        grads = a.model.head_grads(a.features, (classes, weights))
        if grads is not None:
            return a.k.channel_mean(grads)
    g_refs = _main_graph_grads(a, np.repeat(np.arange(n), k), refs.reshape(-1))
    ref_w = a.k.channel_mean(g_refs).reshape(n, k, -1).astype(np.float64)
    target_w = a.k.channel_mean(_target_grads(a)).astype(np.float64)
    return (w.sum(axis=1, keepdims=True) * target_w - alpha * np.einsum("nk,nkc->nc", w, ref_w)).astype(np.float32)


def _main_graph_grads(a: CamInputs, images: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """The layer's gradients of class classes[i] for image images[i], from model.onnx in batches."""
    batch = int(a.options.get("batch_size", 32))
    return np.concatenate([a.model.run(a.inputs[images[s:s + batch]], classes[s:s + batch],
                                       [a.grads_output])[a.grads_output] for s in range(0, len(images), batch)])


def _target_grads(a: CamInputs) -> np.ndarray:
    """a.grads, or the targets' gradients from model.onnx where the explainer did not run it."""
    return a.grads if a.grads is not None else _main_graph_grads(a, np.arange(len(a.targets)), a.targets)


@register("scorecam")
def scorecam(a: CamInputs):
    """Score-CAM (Wang et al., CVPR-W 2020): w_k = softmax(f(X * H_k))_c, where H_k is
    A_k upsampled to the input and min-max normalised. As in the authors' code, a
    constant channel gives no mask and weight 0 (an all-zero channel adds nothing to
    the map either way). Option `scorecam_topk`: keep the k channels of largest
    activation variance, as Faster Score-CAM does, for real time. Each masked image runs
    only where its mask reaches (runtime/masked.py; the same probabilities for about half
    the work) unless `scorecam_crop=False` or the export has no blocks file."""
    n, h, w, c = a.features.shape
    (in_h, in_w), batch = a.inputs.shape[1:3], int(a.options.get("batch_size", 32))
    topk = a.options.get("scorecam_topk")
    masked = a.model.masked_forward() if a.options.get("scorecam_crop", True) else None
    weights = np.zeros((n, c), np.float32)
    for i in range(n):
        acts = np.ascontiguousarray(a.features[i].transpose(2, 0, 1))  # (C, h, w)
        live = np.flatnonzero(acts.max(axis=(1, 2)) > acts.min(axis=(1, 2)))
        if topk:
            live = np.sort(live[np.argsort(-acts[live].var(axis=(1, 2)), kind="stable")[:int(topk)]])
        for start in range(0, len(live), batch):
            chunk = live[start:start + batch]
            masks = a.k.normalize_minmax(a.k.upsample_bilinear(acts[chunk], in_h, in_w))
            if masked is not None:
                probs = masked.probabilities(a.inputs[i], masks)
            else:
                probs = a.model.probabilities(a.k.masked_inputs(a.inputs[i], masks), batch)
            weights[i, chunk] = probs[:, a.targets[i]]
    return weights


@register("ablationcam")
def ablationcam(a: CamInputs):
    """Ablation-CAM (Desai & Ramaswamy, WACV 2020): w_k = (y^c - y_k^c) / y^c, where y_k^c
    is the score with channel k of the feature map set to zero. Only the head is re-run.
    A channel that is already all zero cannot change the score: its weight is 0.
    Where the export measured that the head adds up a positively homogeneous function of each
    channel (pooling, then linear layers: `head_ablation: linear`, export/headgrad.py), the
    drop is exactly y^c - y_k^c = sum_ij A_ij^k d y^c / d A_ij^k (Euler's theorem, channel
    by channel), from the gradient model.onnx already returned: no head run at all (the seed:
    256 head runs an image otherwise). Option `ablation_rerun=True` re-runs the head anyway."""
    n, h, w, c = a.features.shape
    if a.primary and a.grads is not None and a.model.meta.get("head_ablation") == "linear" \
            and not a.options.get("ablation_rerun"):
        base = a.logits[np.arange(n), a.targets].astype(np.float64)
        denom = np.where(np.abs(base) > 1e-7, base, 1e-7)
        drops = np.einsum("nhwc,nhwc->nc", a.grads, a.features, dtype=np.float64)
        return (drops / denom[:, None]).astype(np.float32)
    # 8 copies of a 14x14x256 map are 1.6 MB: they stay in a core's L2 cache between being
    # written here and read by onnxruntime; 32 copies did not, and ran 1.6x slower.
    batch = int(a.options.get("ablation_batch", 8))
    weights = np.zeros((n, c), np.float32)
    buf = np.empty((batch, h, w, c), np.float32)
    for i in range(n):
        t = a.targets[i]
        base = float(a.logits[i, t])
        denom = base if abs(base) > 1e-7 else 1e-7
        live = np.flatnonzero(a.features[i].reshape(-1, c).max(axis=0) > 0)
        for start in range(0, len(live), batch):
            chunk = live[start:start + batch]
            ablated = buf[:len(chunk)]
            ablated[:] = a.features[i]
            ablated[np.arange(len(chunk)), :, :, chunk] = 0.0
            weights[i, chunk] = (base - a.model.head(ablated)[:, t]) / denom
    return weights


def _first_principal_projection(m: np.ndarray, iters: int = 300, tol: float = 1e-10) -> np.ndarray:
    """m @ v1, v1 the first right singular vector of m (hw, C), by power iteration on
    m^T m (a few matrix-vector products); numpy's SVD when it does not converge."""
    v = m.mean(axis=0)
    norm = np.linalg.norm(v)
    if norm == 0:
        return np.zeros(m.shape[0])
    v /= norm
    for _ in range(iters):
        nv = m.T @ (m @ v)
        nn = np.linalg.norm(nv)
        if nn == 0:
            return np.zeros(m.shape[0])
        nv /= nn
        if np.abs(nv - v).max() < tol:
            return m @ nv
        v = nv
    return m @ np.linalg.svd(m, full_matrices=False)[2][0]


@register("eigencam")
def eigencam(a: CamInputs):
    """Eigen-CAM (Muhammad & Yeasin, IJCNN 2020): the projection of the activations on
    their first principal component, O V_1 (no centring, as in the paper). The sign of a
    singular vector is arbitrary: we choose the one whose map agrees with the summed
    activations, so the object is bright, not dark. Class-agnostic."""
    n, h, w, c = a.features.shape
    maps = np.empty((n, h, w), np.float32)
    for i in range(n):
        m = a.features[i].reshape(h * w, c).astype(np.float64)
        proj = _first_principal_projection(m)
        if proj @ m.sum(axis=1) < 0:
            proj = -proj
        maps[i] = proj.reshape(h, w)
    return maps


# Methods that re-run the network on perturbed inputs or features register themselves there
# (after everything above is defined: that module imports register and CamInputs from here).
from explicam.runtime import methods_input, methods_perturb  # noqa: E402,F401
