"""Explaining image files and folders: `python cli.py explain PHOTO.jpg DIR/ --out out/`.

Per image: an overlay PNG (`<name>_<method>.png`; a grid `<name>_all.png` for several
methods), on request the raw heatmap (`<name>_<method>_heatmap.png`, 16-bit, or `.npy`),
and one row per method in `out/predictions.csv`. Folders are walked recursively and their
tree is mirrored under `out/`. Every file is written atomically; the CSV grows as images
are done and is renamed into place at the end, even after Ctrl-C, so no work is lost.
A file that cannot be read is reported and skipped; the run fails only when nothing at
all could be explained.
"""
from __future__ import annotations

import csv
import math
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import cv2
import numpy as np

from explicam.runtime import overlay as ov
from explicam.runtime.images import IMAGE_EXTENSIONS, ImageError, list_images, read_image

DECODE_MIN_SIDE = 512       # huge JPEGs decode at reduced scale but keep >= 1024 px for a sharp overlay
DISPLAY_MIN_SIDE = 128      # smaller photos are enlarged (integer factor, nearest) so labels fit on them
READ_BATCH = 16             # photos decoded and explained together when no batch size is given
BATCH_PIXELS = 48_000_000   # photo pixels held at once, whatever the batch size (~150 MB)
GRID_HEIGHT = 384           # tiles of a several-method grid are at most this tall
IG = "integrated-gradients"  # its rows in predictions.csv carry its completeness error (ig_completeness)
# a method's trial run needs no full mask, channel, noise or path set
PROBE_OPTIONS = {"rise_masks": 2, "scorecam_topk": 1, "smoothgrad_samples": 1, "ig_steps": 2}


@dataclass
class Item:
    path: str   # as the user gave it (or as found in their folder)
    stem: str   # output name relative to out/, without the _method.png suffix


@dataclass
class FilesResult:
    out: str
    csv: str | None
    methods: list
    images: list = field(default_factory=list)     # input paths explained
    written: list = field(default_factory=list)    # their overlay / grid files, in the same order
    skipped: list = field(default_factory=list)    # one-line messages naming the file
    notes: list = field(default_factory=list)
    completeness: list = field(default_factory=list)  # integrated-gradients: each image's relative completeness error
    total: int = 0
    seconds: float = 0.0
    interrupted: bool = False


def parse_methods(method: str, available) -> list:
    """'gradcam', 'gradcam,layercam' or 'all' -> method names (unknown names are an error)."""
    names = list(available) if method == "all" else [m.strip() for m in method.split(",") if m.strip()]
    bad = [m for m in names if m not in available]
    if bad or not names:
        raise ValueError(f"--method: unknown method '{bad[0] if bad else method}'; choose from "
                         f"{', '.join(available)} or all")
    return names


def collect(paths, out: str | None = None) -> tuple[list, list]:
    """Inputs -> (items to explain, problems). Folders are walked recursively; anything
    under the output folder is left out, so a second run never explains its own overlays."""
    out_abs = os.path.abspath(out) + os.sep if out else None
    items, problems, used, seen = [], [], set(), set()

    def add(path, stem):
        real = os.path.realpath(path)
        if (out_abs and os.path.abspath(path).startswith(out_abs)) or real in seen:
            return  # our own outputs, or a photo named twice (a file and its folder)
        seen.add(real)
        key, n = stem.lower(), 1
        while key in used:  # a.jpg and a.png, or the same name in two folders
            n += 1
            key = f"{stem}_{n}".lower()
        used.add(key)
        items.append(Item(path, stem if n == 1 else f"{stem}_{n}"))

    for path in map(os.fspath, paths):
        if os.path.isdir(path):
            found = list_images(path)
            if not found:
                problems.append(f"{path}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)})")
            for f in found:
                add(f, os.path.splitext(os.path.relpath(f, path))[0])
        elif os.path.exists(path):
            add(path, os.path.splitext(os.path.basename(path))[0])  # any extension: the user named it
        else:
            problems.append(f"{path}: no such file or folder")
    return items, problems


def check_writable(out: str) -> None:
    """Fail before any work when the output folder cannot be made or written."""
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except FileExistsError:
        raise ValueError(f"--out {out}: exists and is not a folder") from None
    except OSError as exc:
        raise ValueError(f"--out {out}: cannot write there ({exc.strerror or exc})") from None


def display_image(photo: np.ndarray) -> np.ndarray:
    """The photo the overlay is drawn on: itself, or enlarged by an integer factor (nearest
    neighbour, so pixels stay pixels) when it is too small to carry readable labels."""
    short = min(photo.shape[:2])
    if short >= DISPLAY_MIN_SIDE:
        return photo
    k = math.ceil(DISPLAY_MIN_SIDE / short)
    return cv2.resize(photo, (photo.shape[1] * k, photo.shape[0] * k), interpolation=cv2.INTER_NEAREST)


def tile_rows(tiles, cols: int = 5, gap: int = 4) -> np.ndarray:
    """Equal-height tiles in rows of `cols`, on white (photo + 9 methods: two rows of 5)."""
    rows = [ov.side_by_side(*tiles[i:i + cols], gap=gap) for i in range(0, len(tiles), cols)]
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, gap), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    return np.concatenate(rows)[:-gap]


@dataclass
class FilesConfig:
    """How `cli.py explain PHOTO DIR ...` explains and what it writes (its options)."""
    model: str | None = None        # ONNX model [default: the newest runs/*/model.onnx]
    out: str = "out"                # output folder; folders given as input are mirrored under it
    method: str = "gradcam"         # one method, several comma-separated, or "all" (a grid)
    target: object = None           # class name or index [default: each image's top-1]
    top_k: int = 3                  # classes written on overlays and in predictions.csv
    alpha: float = 0.5              # heatmap opacity over the photo
    colormap: str = "jet"
    side_by_side: bool = False      # the photo and its overlay next to each other
    heatmap: str | None = None      # also save the raw heatmap: "png" (16-bit) or "npy"
    labels: bool = True             # predictions written on the overlays
    batch_size: int | None = None   # images per onnxruntime call [default: Explainer's, 4 at 224 px]
    kernels: str = "auto"           # camkernels backend: auto, numba or numpy
    threads: int | None = None      # onnxruntime intra-op threads [default: all cores]
    placement: str | None = None    # geometric / naive [default: the model's, runtime/placement.py]
    feature_layer: str | None = None  # which feature layer single-layer methods read (Explainer; export --layer a,b)
    options: dict = field(default_factory=dict)  # method options: rise_masks, finercam_k, ... (runtime/methods*.py)
    preprocess: dict | None = None  # a plain ONNX classifier's preprocessing, for RISE (runtime/plain.py)


class Writer:
    """Everything written for one image, from one Explanation per method."""

    def __init__(self, cfg: FilesConfig, methods, top_k=None):
        ov.Blender(cfg.alpha, cfg.colormap)  # checks --alpha and --colormap
        if cfg.heatmap not in (None, "png", "npy"):
            raise ValueError(f"--heatmap must be png or npy, got {cfg.heatmap!r}")
        self.out, self.methods, self.top_k = cfg.out, methods, max(1, int(cfg.top_k if top_k is None else top_k))
        self.alpha, self.colormap, self.side = cfg.alpha, cfg.colormap, cfg.side_by_side
        self.heatmap, self.labels = cfg.heatmap, cfg.labels

    def header(self) -> list:
        cols = ["file"]
        for i in range(1, self.top_k + 1):
            cols += [f"class_{i}", f"prob_{i}"]
        return cols + ["method", "target", "output"] + (["ig_completeness"] if IG in self.methods else [])

    def write(self, item: Item, photo: np.ndarray, results: dict, i: int) -> tuple[str, list]:
        """Write the image's files; returns (overlay path, CSV rows)."""
        base = os.path.join(self.out, item.stem)
        os.makedirs(os.path.dirname(base) or ".", exist_ok=True)
        shown = display_image(photo)
        first = results[self.methods[0]]
        top = first.top_k(self.top_k)[i]
        target = first.target_names[i]
        overlays = {m: ov.overlay(shown, results[m].heatmap_on(i, shown.shape), self.alpha, self.colormap)
                    for m in self.methods}
        if len(self.methods) == 1:
            image = overlays[self.methods[0]]
            if self.labels:
                ov.draw_labels(image, ov.label_lines(top, self.methods[0], target))
            if self.side:
                image = ov.side_by_side(shown, image)
            path = f"{base}_{self.methods[0]}.png"
        else:
            if shown.shape[0] > GRID_HEIGHT:  # ten 4000 px tiles side by side help nobody
                shown = cv2.resize(shown, (max(1, shown.shape[1] * GRID_HEIGHT // shown.shape[0]), GRID_HEIGHT),
                                   interpolation=cv2.INTER_AREA)
                overlays = {m: ov.overlay(shown, results[m].heatmap_on(i, shown.shape), self.alpha, self.colormap)
                            for m in self.methods}
            tiles = [ov.titled(shown, "photo")] + [ov.titled(overlays[m], m) for m in self.methods]
            image = tile_rows(tiles)
            if self.labels:
                ov.draw_labels(image, ov.label_lines(top, None, None) + [f"target: {target}"], corner=(6, 28))
            path = f"{base}_{'all' if len(self.methods) > 2 else '+'.join(self.methods)}.png"
        ov.save_png(path, image)
        for m in self.methods if self.heatmap else ():
            self._save_heatmap(f"{base}_{m}_heatmap", results[m].heatmaps[i])
        row = [item.path] + [v for name, p in top for v in (name, f"{p:.6f}")]
        rows = [row + [m, target, os.path.relpath(path, self.out)] for m in self.methods]
        if IG in self.methods:  # |sum(attributions) - (F(x) - F(x'))| / |F(x) - F(x')|, on the IG row
            rows = [r + [f"{results[IG].notes['ig_completeness'][i]:.6g}" if m == IG else ""]
                    for r, m in zip(rows, self.methods)]
        return path, rows

    def _save_heatmap(self, base: str, heat: np.ndarray) -> None:
        if self.heatmap == "png":
            ov.save_png(base + ".png", np.round(np.clip(heat, 0, 1) * 65535).astype(np.uint16))
            return
        tmp = base + ".npy.partial"
        with open(tmp, "wb") as f:
            np.save(f, heat.astype(np.float32))
        os.replace(tmp, base + ".npy")


def _read_batch(items, batch_size: int, min_side: int):
    """The next batch: [(item, photo or ImageError message)], bounded by count and pixels."""
    batch, pixels = [], 0
    for item in items:
        try:
            photo = read_image(item.path, min_side=min_side)
            pixels += photo.shape[0] * photo.shape[1]
            batch.append((item, photo))
        except ImageError as exc:
            batch.append((item, str(exc)))
        if len(batch) >= batch_size or pixels >= BATCH_PIXELS:
            break
    return batch


def explain_files(paths, cfg: FilesConfig | None = None, explainer=None, progress=None, on_start=None,
                  **options) -> FilesResult:
    """Explain every image in `paths` (files and folders) into `cfg.out`. `options` set
    FilesConfig fields (explain_files(paths, out="o", method="all")). Raises ValueError only
    when nothing could be done; per-file problems end up in result.skipped.
    explainer: an Explainer to use instead of opening cfg.model; progress(n) after each
    batch; on_start(result) once the inputs are walked and the model is loaded."""
    from dataclasses import replace

    from explicam.runtime.methods import METHODS

    cfg = replace(cfg or FilesConfig(), **options)
    out, target, batch_size = cfg.out, cfg.target, cfg.batch_size
    t0 = time.perf_counter()
    methods = parse_methods(cfg.method, list(METHODS))
    Writer(cfg, methods)  # bad options fail before any work
    items, problems = collect(paths, out)
    if not items:
        raise ValueError(problems[0] if len(problems) == 1 else "nothing to explain: " + "; ".join(problems))
    check_writable(out)
    if explainer is None:
        from explicam.runtime.model import newest_model
        from explicam.runtime.plain import open_explainer

        explainer = open_explainer(cfg.model or newest_model(), cfg.preprocess, kernels=cfg.kernels,
                                   threads=cfg.threads, batch_size=batch_size, placement=cfg.placement,
                                   options=cfg.options,
                                   **({"feature_layer": cfg.feature_layer} if cfg.feature_layer else {}))
    if cfg.method == "all":  # what this model offers (a plain classifier: RISE alone)
        methods = [m for m in methods if m in explainer.methods]
    explainer.resolve_targets(target, 1)  # an unknown --target fails now, not per image
    result = FilesResult(out, None, [], skipped=list(problems), total=len(items))
    result.methods = methods = usable_methods(explainer, methods, result.notes)
    writer = Writer(cfg, methods, min(cfg.top_k, len(explainer.class_names)))
    if on_start:
        on_start(result)
    csv_path = os.path.join(out, "predictions.csv")
    partial = csv_path + ".partial"
    try:
        _run(explainer, writer, items, methods, target, batch_size, partial, result, progress)
    finally:  # whatever stopped the run, the rows of the images done so far are kept
        if result.images:
            os.replace(partial, csv_path)
            result.csv = csv_path
        elif os.path.exists(partial):
            os.remove(partial)
    result.seconds = time.perf_counter() - t0
    if not result.images and not result.interrupted:
        raise ValueError("no image could be explained: " + "; ".join(result.skipped[:3]) +
                         (f" (and {len(result.skipped) - 3} more)" if len(result.skipped) > 3 else ""))
    return result


def usable_methods(explainer, methods: list, notes: list) -> list:
    """Try each method once on a blank image: one the model cannot do (classic CAM needs a
    GAP head) is an error when it is the only one asked for, else left out with a note."""
    from explicam.runtime.methods import MethodError

    probe = np.zeros((1, *explainer.input_hw, 3), np.uint8)
    usable = []
    for m in methods:
        try:
            explainer.explain(probe, m, **PROBE_OPTIONS)
            usable.append(m)
        except MethodError as exc:
            if len(methods) == 1:
                raise
            notes.append(f"{m} left out: {exc}")
    return usable


def _run(explainer, writer, items, methods, target, batch_size, partial, result, progress) -> None:
    queue, size = iter(items), max(1, int(batch_size or READ_BATCH))
    min_side = max(*explainer.input_hw, DECODE_MIN_SIDE)
    with open(partial, "w", newline="") as f, ThreadPoolExecutor(1) as pool:
        rows = csv.writer(f)
        rows.writerow(writer.header())
        # decoding the next batch overlaps explaining this one (OpenCV releases the GIL)
        pending = pool.submit(_read_batch, queue, size, min_side)
        try:
            while True:
                batch = pending.result()
                if not batch:
                    break
                pending = pool.submit(_read_batch, queue, size, min_side)
                _explain_batch(explainer, writer, batch, methods, target, rows, result)
                f.flush()
                if progress:
                    progress(len(batch))
        except KeyboardInterrupt:
            result.interrupted = True
            pending.cancel()


def _explain_batch(explainer, writer, batch, methods, target, rows, result) -> None:
    good = [(item, photo) for item, photo in batch if not isinstance(photo, str)]
    result.skipped.extend(photo for _, photo in batch if isinstance(photo, str))
    if not good:
        return
    results = explainer.explain_methods([p for _, p in good], methods, target)
    for i, (item, photo) in enumerate(good):
        try:
            path, lines = writer.write(item, photo, results, i)
        except OSError as exc:  # a full disk, a name the file system refuses, ...
            result.skipped.append(f"{item.path}: cannot write its output in {writer.out} ({exc.strerror or exc})")
            continue
        rows.writerows(lines)
        result.written.append(path)
        result.images.append(item.path)
        if IG in methods:
            result.completeness.append(float(results[IG].notes["ig_completeness"][i]))


def completeness_line(result: FilesResult, options: dict) -> str | None:
    """The console's summary of Integrated Gradients' completeness (None when it did not run)."""
    from explicam.runtime.methods_input import IG_DEFAULTS

    if not result.completeness:
        return None
    steps = options.get("ig_steps") or IG_DEFAULTS["ig_steps"]
    return (f"integrated-gradients completeness: max |sum(attr) - (f(x)-f(x0))| / |f(x)-f(x0)| = "
            f"{100 * max(result.completeness):.3g}% (median {100 * float(np.median(result.completeness)):.3g}%) over "
            f"{len(result.completeness)} image(s) (steps {steps}); per image in predictions.csv, ig_completeness")
