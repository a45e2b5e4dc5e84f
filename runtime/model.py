"""OnnxModel: an onnxruntime session plus everything the file's metadata says.

The metadata written by `cli.py export` is the single source of truth for how to
preprocess (input size, layout, channel order, value range), what the classes are
called and where the feature map and its gradient come from. Nothing here guesses.
"""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort

from explicam.runtime.images import fit_to_input, heatmap_on_photo

REQUIRED_META = ("class_names", "input_size", "value_range", "feature_layer", "feature_shape", "head")
# The explicam input is always (N, H, W, 3) float32 RGB in value_range, resized as the
# metadata's `resize` says: a model that wants BGR, grey, NCHW or mean/std normalisation
# does that inside its exported graph (export/prologue.py), so the runtime keeps one layout.
REQUIRED_OUTPUTS = ("logits", "probabilities", "features", "grads")


class ModelError(ValueError):
    """A model file the runtime cannot use; str() is one line naming the file."""


class NotExported(ModelError):
    """A loadable ONNX file without explicam's metadata: a plain classifier (RISE can still
    explain it, runtime/plain.py)."""


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """onnxruntime tuned for a small CPU: all graph optimisations, one intra-op pool the
    size of the machine, its threads spinning between the ops of a call but not between calls
    (force_spinning_stop: a webcam loop idles a lot, and the numba kernels after a call need
    the cores; tests/test_session_idle.py). Against no spinning at all, on 2 cores, in
    alternating runs of `bench`: the seed's forward 0-11% faster, its saliency 8-30% at batch
    32, EfficientNet-Lite0's forward at batch 1 6-28%."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads or os.cpu_count() or 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1")
    opts.add_session_config_entry("session.force_spinning_stop", "1")
    opts.log_severity_level = 3
    return opts


def _session(path: str, threads: int | None):
    if not os.path.exists(path):
        raise ModelError(f"{path}: no such model file")
    if os.path.isdir(path):
        raise ModelError(f"{path}: is a folder; pass the model.onnx inside it")
    try:
        return ort.InferenceSession(path, session_options(threads), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for corrupt files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{path}: not a loadable ONNX model ({first[:160]})") from None


class OnnxModel:
    """The exported classifier: preprocess, forward with features and gradients, head."""

    def __init__(self, path: str, threads: int | None = None):
        self.path = os.fspath(path)
        self.threads = threads
        self.session = _session(self.path, threads)
        raw = self.session.get_modelmeta().custom_metadata_map
        self.export_id = raw.get("export_id")  # shared by the files of one export (None: older exports)
        missing = [k for k in REQUIRED_META if k not in raw]
        if missing:
            raise NotExported(f"{self.path}: not an explicam export (metadata {', '.join(missing)} missing); "
                             "export it with: python cli.py export")
        outputs = self.output_names = [o.name for o in self.session.get_outputs()]
        if any(o not in outputs for o in REQUIRED_OUTPUTS):
            raise ModelError(f"{self.path}: outputs {outputs} lack one of {', '.join(REQUIRED_OUTPUTS)}")
        self.meta = meta = parse_metadata(raw)
        self.class_names = [str(c) for c in meta["class_names"]]
        size = meta["input_size"]  # S for a square input, [H, W] otherwise
        self.input_hw = (int(size), int(size)) if np.ndim(size) == 0 else (int(size[0]), int(size[1]))
        self.input_size = self.input_hw[0] if self.input_hw[0] == self.input_hw[1] else None
        # "bilinear": the whole photo squeezed to the input; "shorter": torchvision's
        # Resize(S) + CenterCrop, the shorter side to resize_shorter, then the centre window
        self.resize_shorter = int(meta["resize_shorter"]) if meta.get("resize") == "shorter" else None
        self.value_range = tuple(float(v) for v in meta["value_range"])
        self.feature_shape = tuple(int(d) for d in meta["feature_shape"])
        self.head_kind = meta["head"]
        self.kernel = meta.get("kernel")
        self.input_name = meta.get("input_name", "image")
        self._head = None
        self._headgrad = {}  # {threads: model.headgrad.onnx's session or None}, each opened on first use
        # mean_ij d logits[class] / d features where that is constant: (classes, C) rows, each read once
        self._rows, self._have_rows = None, None
        self._recipro = None  # model.recipro.onnx's session, opened on first use; False: none
        self._input_grads = {}  # {(file key, threads): session of model.inputgrads.onnx / model.guidedgrads.onnx}, on first use
        self._pool = None  # (ThreadPoolExecutor, its size) of the input-gradient pipelines, on first use
        self._forward = None  # model.forward.onnx's session, opened on first use; False: none
        self._forward_features = False  # that session outputs `features` (older exports' do not)
        self._masked = None  # runtime.masked.MaskedForward over model.blocks.onnx; False: none

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def feature_layers(self) -> list:
        """[{"name", "layer", "features", "grads", "feature_shape", "geometry"}] of every feature
        layer the file outputs, the primary first (export --layer a,b,c writes several)."""
        layers = self.meta.get("feature_layers")
        if not (isinstance(layers, list) and layers):   # an export of one layer, or from before
            layers = self.meta["feature_layers"] = [
                {"name": self.meta["feature_layer"], "layer": self.meta["feature_layer"], "features": "features",
                 "grads": "grads", "feature_shape": list(self.feature_shape), "geometry": self.meta.get("geometry")}]
        return layers

    @property
    def has_input_grads(self) -> bool:
        """True when the export wrote model.inputgrads.onnx (export --input-grads)."""
        return bool(self.meta.get("input_grads_file"))

    @property
    def workers(self) -> int:
        """Threads this model may use: its `threads`, else the machine's cores."""
        return max(1, int(self.threads or os.cpu_count() or 1))

    def input_gradients(self, x: np.ndarray, targets, guided: bool = False, threads: int | None = None) -> dict:
        """{"input_grads": d logits[target] / d image (N, H, W, 3), "logits", "probabilities",
        "target_used"} from model.inputgrads.onnx for preprocessed images (guided: guided
        backpropagation's, from model.guidedgrads.onnx; an export from before 2026-12 has one
        file with a `guided` switch input). threads: the session's intra-op threads (None: the
        model's); 1 for the one-thread pipelines of runtime/methods_input.py, which call this
        from several threads at once (onnxruntime's run is thread-safe)."""
        key, (session, switched) = self.input_grads_session(guided, threads)
        feeds = {self.input_name: np.ascontiguousarray(x, np.float32), "target": np.asarray(targets, np.int64)}
        if switched:   # the one-file export of before
            feeds["guided"] = np.array([bool(guided)])
        elif guided and key == "input_grads_file":
            raise ModelError(f"{self.path}: this export has no guided backpropagation file; re-export it with --input-grads")
        names = ["input_grads", "logits", "probabilities", "target_used"]
        return dict(zip(names, session.run(names, feeds)))

    def pipeline_pool(self, size: int) -> ThreadPoolExecutor:
        """A pool of at least `size` threads for the input-gradient pipelines, made on first use."""
        if self._pool is None or self._pool[1] < size:
            if self._pool is not None:
                self._pool[0].shutdown(wait=False)   # its threads end once their calls are done
            self._pool = (ThreadPoolExecutor(size, thread_name_prefix="explicam-grads"), size)
        return self._pool[0]

    def input_grads_session(self, guided: bool = False, threads: int | None = None):
        """(file key, (session, has the old `guided` switch input)), the session opened on first use."""
        key = "guided_grads_file" if guided and self.meta.get("guided_grads_file") else "input_grads_file"
        if (key, threads) not in self._input_grads:
            name = self.meta.get(key)
            if not name:
                raise ModelError(f"{self.path}: no input gradients in this export; re-export it with --input-grads")
            session = self._side_file(name, threads)
            if session is None:
                raise ModelError(f"{os.path.join(os.path.dirname(os.path.abspath(self.path)), name)}: missing or from "
                                 f"another export than {os.path.basename(self.path)}; copy the files of one export "
                                 "together, or re-export with --input-grads")
            inputs = [*session.get_inputs(), *session.get_overridable_initializers()]   # (guided had a default)
            self._input_grads[key, threads] = (session, any(i.name == "guided" for i in inputs))
        return key, self._input_grads[key, threads]

    def preprocess(self, images) -> np.ndarray:
        """RGB uint8 image(s) of any size -> (N, H, W, 3) float32 in the model's value range.

        Float arrays already at (N, H, W, 3) are taken as preprocessed (the evaluation
        feeds perturbed inputs that way)."""
        if isinstance(images, np.ndarray) and images.ndim == 3:
            images = [images]
        (h, w), (lo, hi) = self.input_hw, self.value_range
        if isinstance(images, np.ndarray) and images.dtype != np.uint8:
            if images.shape[1:] != (h, w, 3):
                raise ValueError(f"float images must be preprocessed to (N, {h}, {w}, 3); got {images.shape}")
            return np.ascontiguousarray(images, np.float32)
        out = np.empty((len(images), h, w, 3), np.float32)
        for i, img in enumerate(images):
            img = np.asarray(img)
            if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
                raise ValueError(f"image {i}: expected an RGB uint8 array (H, W, 3), got {img.dtype} {img.shape}")
            # uint8 -> float and the scaling in one pass
            np.multiply(self.fit(img), np.float32((hi - lo) / 255.0), out=out[i])
        if lo:
            out += lo
        return out

    def fit(self, image: np.ndarray) -> np.ndarray:
        """An RGB uint8 image (or a mask) resized as the model's preprocessing says."""
        return fit_to_input(image, self.input_hw, self.resize_shorter)

    def on_photo(self, heatmap: np.ndarray, shape) -> np.ndarray:
        """A heatmap at input size mapped back onto a photo of `shape` (h, w) through the
        same resize (plain or shorter-side crop), so it sits where the model looked."""
        return heatmap_on_photo(heatmap, shape[:2], self.resize_shorter)

    def run(self, x: np.ndarray, targets: np.ndarray, outputs=None) -> dict:
        """One onnxruntime call: logits, probabilities, features, grads, target_used."""
        names = outputs or self.output_names
        values = self.session.run(names, {self.input_name: x, "target": np.asarray(targets, np.int64)})
        return dict(zip(names, values))

    def _side_file(self, name: str, threads: int | None = None):
        """A session of a file written beside model.onnx by the same export, else None.
        A side file left over from another export (model.onnx copied over on its own)
        carries another export_id: it would give another model's numbers."""
        path = os.path.join(os.path.dirname(os.path.abspath(self.path)), name)
        if not os.path.isfile(path):
            return None
        session = _session(path, threads or self.threads)
        if session.get_modelmeta().custom_metadata_map.get("export_id") != self.export_id:
            return None
        return session

    def forward_session(self):
        """A session of model.forward.onnx (the classifier without the gradient subgraph),
        or None when the export has none (INT8 files, older exports), it was not copied, or
        it belongs to another export: the main graph then answers, a little slower."""
        if self._forward is None:
            name = self.meta.get("forward_file")
            self._forward = (self._side_file(name) if name else None) or False
            self._forward_features = bool(self._forward) and "features" in [o.name for o in self._forward.get_outputs()]
        return self._forward or None

    def forward_features(self, x: np.ndarray):
        """{"logits", "probabilities", "features"} (the primary layer's) from one pass of
        model.forward.onnx, without the main graph's gradient subgraph; None when the export
        has no forward file or an older one without `features` (the main graph answers)."""
        forward = self.forward_session()
        if forward is None or not self._forward_features:
            return None
        names = ["logits", "probabilities", "features"]
        return dict(zip(names, forward.run(names, {self.input_name: np.ascontiguousarray(x, np.float32)})))

    def masked_forward(self):
        """A MaskedForward (Score-CAM's masked inputs, run only where each mask reaches) over
        model.blocks.onnx and model.head.onnx, or None when the export has no blocks file
        (INT8 files, another body than the seed's, older exports) or one of the two is
        missing or from another export: Score-CAM then runs whole masked images."""
        if self._masked is None:
            from explicam.runtime.masked import MaskedForward

            name, geometry = self.meta.get("blocks_file"), self.meta.get("blocks")
            blocks = self._side_file(name, threads=1) if name and geometry else None
            head = self._side_file(self.meta.get("head_file") or "", threads=1) if blocks else None
            forward = self._side_file(self.meta.get("forward_file") or "", threads=1) if head else None
            self._masked = (MaskedForward(blocks, head, geometry, self.input_hw[0], self.threads, forward,
                                          self.input_name) if head else False)
        return self._masked or None

    def probabilities(self, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Class probabilities for many preprocessed inputs (perturbation methods and metrics).
        onnxruntime runs every node of a graph whatever is asked of it, so this goes to the
        pruned classifier where the export wrote one: 5-9% less than the main graph."""
        forward = self.forward_session()
        out = []
        for i in range(0, len(x), batch_size):
            chunk = np.ascontiguousarray(x[i:i + batch_size], np.float32)
            if forward is not None:
                out.append(forward.run(["probabilities"], {self.input_name: chunk})[0])
            else:
                out.append(self.run(chunk, np.full(len(chunk), -1, np.int64), ["probabilities"])["probabilities"])
        return np.concatenate(out) if out else np.zeros((0, self.num_classes), np.float32)

    def head(self, features: np.ndarray, output: str = "logits") -> np.ndarray:
        """Logits (or `output="probabilities"`) from conv4 features alone (the exported head
        graph), for Ablation-CAM and Recipro-CAM."""
        if self._head is None:
            head_file = self.meta.get("head_file")
            if not head_file:
                raise ModelError(f"{self.path}: no head graph recorded in the metadata; re-export the model")
            path = os.path.join(os.path.dirname(os.path.abspath(self.path)), head_file)
            if not os.path.isfile(path):
                raise ModelError(f"{path}: no such file; Ablation-CAM and Recipro-CAM re-run the head graph "
                                 f"written beside {os.path.basename(self.path)}: copy it too, or re-export")
            self._head = self._side_file(head_file)
            if self._head is None:
                raise ModelError(f"{path}: belongs to another export than {self.path} (export_id differs); "
                                 "copy the files of one export together, or re-export")
        return self._head.run([output], {"features": np.ascontiguousarray(features, np.float32)})[0]


    def head_grads(self, features: np.ndarray, seed):
        """d sum_c seed[n, c] logits[n, c] / d features (N, h, w, C) through the head alone
        (model.headgrad.onnx: Finer-CAM's score combinations in one cheap pass), or None when
        the export wrote no such file (older exports, heads that read the image): the caller
        then runs model.onnx once per class instead. `seed`: (N, classes), or the pair
        (classes (N, K) int, weights (N, K)) of its few nonzero entries, which the file takes.
        A pass of one or two images runs on one thread: the head is too small to split (at
        batch 1 on 2 cores, 0.13 vs 0.17 ms on the seed's 14x14x256 head, 0.10 vs 0.12 ms on
        EfficientNet-Lite0's); from batch 4 on the machine's threads win (seed, batch 32:
        3.6 vs 4.7 ms)."""
        session = self._headgrad_session(1 if len(features) <= 2 else self.threads)
        if session is None:
            return None
        n = len(features)
        if isinstance(seed, tuple):
            classes, weights = (np.asarray(v).reshape(n, -1) for v in seed)
        else:   # the nonzero entries of each row, first; the file then reads only their rows
            dense = np.asarray(seed).reshape(n, -1)
            nonzero = dense != 0
            classes = np.argsort(~nonzero, axis=1, kind="stable")[:, :max(1, int(nonzero.sum(axis=1).max()))]
            weights = np.take_along_axis(dense, classes, axis=1)
        return session.run(["grads"], {"features": np.ascontiguousarray(features, np.float32),
                                       "classes": np.ascontiguousarray(classes, np.int64),
                                       "weights": np.ascontiguousarray(weights, np.float32)})[0]

    @property
    def has_head_grads(self) -> bool:
        """True when model.headgrad.onnx is there and of this export (head_grads answers)."""
        return self._headgrad_session(1) is not None

    @property
    def constant_channel_grads(self) -> bool:
        """True when the export measured the head's channel-mean gradients constant (pooling,
        flatten, linear layers: export/headgrad.channel_grads_constant) and its headgrad file is
        here: Grad-CAM's and Finer-CAM's weights are then channel_grad_rows, no gradient pass."""
        return self.meta.get("head_channel_grads") == "constant" and self.has_head_grads

    def channel_grad_rows(self, classes, features: np.ndarray) -> np.ndarray:
        """(len(classes), C) float32: mean_ij d logits[c] / d features[i, j] for each class c, on a
        head whose such means do not depend on the features (constant_channel_grads). A class's
        row comes from one model.headgrad.onnx pass on `features[:1]` the first time it is asked
        for, then from memory: at most one row per class, C floats each."""
        classes = np.asarray(classes, np.int64).reshape(-1)
        if self._rows is None:
            self._rows = np.zeros((self.num_classes, features.shape[-1]), np.float32)
            self._have_rows = np.zeros(self.num_classes, bool)
        have = self._have_rows[classes]
        if not have.all():   # the first time a class is asked for: its row from the head's gradient
            missing = np.unique(classes[~have])
            for s in range(0, len(missing), 32):
                chunk = missing[s:s + 32]
                feats = np.broadcast_to(features[:1], (len(chunk), *features.shape[1:]))
                grads = self.head_grads(feats, (chunk[:, None], np.ones((len(chunk), 1), np.float32)))
                self._rows[chunk] = grads.astype(np.float64).mean(axis=(1, 2)).astype(np.float32)
                self._have_rows[chunk] = True
        return self._rows[classes]   # a copy: one indexing, the per-frame cost

    def _headgrad_session(self, threads: int | None):
        """model.headgrad.onnx's session with `threads` intra-op threads (None: the model's
        own), opened on first use, or None when the export has no usable such file (an
        earlier export's took a dense seed: its Finer-CAM runs the main graph instead)."""
        if threads not in self._headgrad:
            name = self.meta.get("headgrad_file")
            session = None
            if name and not (self._headgrad and not any(self._headgrad.values())):   # not already found unusable
                session = self._side_file(name, threads=threads)
            if session is not None and [i.name for i in session.get_inputs()] != ["features", "classes", "weights"]:
                session = None
            self._headgrad[threads] = session
        return self._headgrad[threads]


    def recipro(self, features: np.ndarray, chunk: int = 8):
        """(N, h*w, classes): the head's softmax scores of each position's one-hot masked map
        (model.recipro.onnx, Recipro-CAM without writing the maps), or None when the export
        has no such file (a head of another shape, an older export)."""
        if self._recipro is None:
            name = self.meta.get("recipro_file")
            self._recipro = (self._side_file(name) if name else None) or False
        if not self._recipro:
            return None
        f = np.ascontiguousarray(features, np.float32)
        return np.concatenate([self._recipro.run(["recipro"], {"features": f[s:s + chunk]})[0]
                               for s in range(0, len(f), chunk)])


def parse_metadata(raw: dict) -> dict:
    """An ONNX file's metadata_props (strings) with the JSON values decoded, the rest as they are."""
    meta = {}
    for key, value in raw.items():
        try:
            meta[key] = json.loads(value)
        except ValueError:
            meta[key] = value
    return meta


def newest_model(pattern: str = "runs/*/model.onnx") -> str:
    """The most recently written model.onnx under runs/ (the default --model)."""
    import glob

    found = sorted(glob.glob(pattern), key=os.path.getmtime)
    if not found:
        raise ModelError(f"no model found ({pattern}); train and export one first "
                         "(python cli.py demo), or pass --model PATH")
    return found[-1]
