"""`python cli.py evaluate`: every metric for every method on the validation split.

    run_evaluation("runs/k4/model.onnx", "data/synth", EvalConfig(methods=["gradcam"]))

writes, into `out` (default: eval/ beside the model), atomically:
    metrics.csv     one row per method plus the `random` chance row
    metrics.json    the same with settings, chance levels, sanity stages, habitat split, timings
    per_image.csv   every per-image number, for your own statistics
    examples.npz    the heatmaps of one validation image per class, for the report

All model calls go through onnxruntime in batches (evaluate.metrics); only the
randomisation test (evaluate.sanity) needs TensorFlow, and it is skipped with a note
when TensorFlow or model.keras is missing.
"""
from __future__ import annotations

import csv
import io
import json
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from explicam.evaluate import metrics as M
from explicam.evaluate.counterfactual import counterfactual_accuracy, counterfactual_text
from explicam.evaluate.inputs import first_per_class, habitat_groups, load_eval_set
from explicam.evaluate.placements import effective_localisation, localisation_by_placement, placement_text
from explicam.evaluate.sanity import compare_maps
from explicam.runtime.methods import METHODS as _ALL  # noqa: F401  (every method registered, in order, first)
from explicam.runtime.methods_input import INPUT_GRAD_METHODS

RANDOM = "random"
COLUMNS = ("method", "images", "placement", "avg_drop", "increase_in_confidence", "deletion_auc", "insertion_auc",
           "pointing_game", "energy_pointing_game", "pointing_naive", "energy_naive", "pointing_geometric",
           "energy_geometric", "pointing_effective", "energy_effective", "object_share", "sanity_spearman",
           "sanity_flag", "explain_s")
TIMED = ("explain", "drop_increase", "deletion_insertion", "localisation", "effective", "sanity")


@dataclass
class EvalConfig:
    methods: list | None = None   # None: every method the model supports
    limit: int | None = None      # class-balanced first N validation images
    steps: int = 16               # deletion / insertion steps
    deletion_baseline: str = "black"   # RISE: delete to black ...
    insertion_baseline: str = "blur"   # ... insert into a blurred copy
    batch_size: int = 128         # inputs per onnxruntime call for perturbations
    scorecam_topk: int | None = None
    sanity_images: int = 16       # 0 skips the randomisation test
    target: str = "predicted"     # or "label"
    tolerance: int = 0            # pointing game tolerance in pixels
    seed: int = 0
    threads: int | None = None
    masks: str | None = None
    boxes: str | None = None
    placement: str | None = None  # heatmaps for every metric; None: the model's default (geometric if known)
    effective_images: int = 8     # images for the effective centres (needs TensorFlow, model.keras); 0 skips
    method_options: dict = field(default_factory=dict)  # rise_masks, finercam_k, ... (runtime/methods*.py)
    feature_layer: str | None = None  # which of the file's feature layers single-layer methods read (Explainer)

    def key(self) -> dict:
        """What decides whether a saved evaluation can be reused."""
        return {k: v for k, v in asdict(self).items() if k != "threads"}


class Ticker:
    """Progress lines with an estimate of time left, at most one per `every` seconds."""

    def __init__(self, label, total, log, every=10.0):
        self.label, self.total, self.log, self.every = label, total, log, every
        self.done, self.t0, self.last = 0, time.time(), time.time()

    def __call__(self, n=1):
        self.done += n
        now = time.time()
        if now - self.last >= self.every and self.done < self.total:
            rate = self.done / (now - self.t0)
            self.log(f"    {self.label}: {self.done}/{self.total}, ~{(self.total - self.done) / rate:.0f}s left")
            self.last = now


def default_methods(head_kind: str, input_grads: bool = False) -> list:
    """Every method the model supports: classic CAM only on a GAP head, the input-gradient
    methods only where the export wrote input gradients (--input-grads)."""
    from explicam.runtime.methods import METHODS

    return [m for m in METHODS if (m != "cam" or head_kind == "gap") and (input_grads or m not in INPUT_GRAD_METHODS)]


def _write_atomic(path: str, text: str) -> None:
    tmp = path + ".partial"
    with open(tmp, "w", newline="") as f:
        f.write(text)
    os.replace(tmp, path)


def _cell(v):
    if isinstance(v, (float, np.floating)):
        return "" if not np.isfinite(v) else f"{float(v):.6g}"
    return v


def _csv_text(rows, columns) -> str:
    """CSV with 6 significant digits; a value that does not exist (NaN) is an empty cell."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: _cell(v) for k, v in r.items()})
    return buf.getvalue()


def json_safe(obj):
    """NaN and infinity -> null (strict JSON), numpy scalars -> Python numbers."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def _explain_all(ex, x, method, targets, cfg, log):
    """(heatmaps, cams) for every image, in chunks so that progress can be shown."""
    chunk = 32 if method in ("scorecam", "rise") else 256
    tick = Ticker(f"{method}: explaining", len(x), log)
    out, cams, deltas = [], [], []
    for s in range(0, len(x), chunk):
        res = ex.explain(x[s:s + chunk], method, targets[s:s + chunk], batch_size=cfg.batch_size)
        out.append(res.heatmaps)
        cams.append(res.cams)
        tick(len(out[-1]))
        if "ig_delta" in res.notes:  # Integrated Gradients' completeness, relative to F(x) - F(x')
            deltas.append(np.abs(res.notes["ig_delta"]) / np.maximum(np.abs(res.notes["ig_score_difference"]), 1e-12))
    if deltas:
        d = np.concatenate(deltas)
        log(f"  {method}: completeness |sum of attributions - (F(x) - F(baseline))| / |F(x) - F(baseline)|: "
            f"median {np.median(d):.2e}, max {d.max():.2e}")
    return np.concatenate(out), np.concatenate(cams)


def _score(name, heat, cams, ctx, cfg, timing, log) -> tuple[dict, dict]:
    """All non-sanity metrics of one method's heatmaps: (summary row, per-image arrays)."""
    model, x, t = ctx["model"], ctx["x"], ctx["targets"]
    idx = np.arange(len(x))
    before = dict(timing)
    t0 = time.time()
    p_expl = model.probabilities(M.explanation_maps(x, heat, model.value_range), cfg.batch_size)[idx, t]
    timing["drop_increase"] += time.time() - t0
    t0 = time.time()
    tick = Ticker(f"{name}: deletion/insertion", len(x), log)
    dele, ins = M.deletion_insertion_curves(model, x, heat, t, ctx["p_orig"], ctx["bases"], ctx["p_bases"], cfg.steps,
                                            cfg.batch_size, cfg.seed, tick)
    timing["deletion_insertion"] += time.time() - t0
    t0 = time.time()
    per = {"drop": 100 * np.maximum(0, ctx["p_orig"] - p_expl) / np.maximum(ctx["p_orig"], 1e-12),
           "increase": (ctx["p_orig"] < p_expl).astype(float), "deletion_auc": M.auc(dele),
           "insertion_auc": M.auc(ins)}
    row = {"method": name, "images": len(x), "avg_drop": M.average_drop(ctx["p_orig"], p_expl),
           "increase_in_confidence": M.increase_in_confidence(ctx["p_orig"], p_expl),
           "deletion_auc": float(per["deletion_auc"].mean()), "insertion_auc": float(per["insertion_auc"].mean()),
           "deletion_curve": dele.mean(axis=0).round(5).tolist(), "insertion_curve": ins.mean(axis=0).round(5).tolist()}
    masks = ctx["masks"]
    if masks is not None:
        per["pointing"] = M.pointing_game(heat, masks, cfg.tolerance)
        per["energy"] = M.energy_pointing_game(heat, masks)
        row.update(pointing_game=M.nanmean(per["pointing"]), energy_pointing_game=M.nanmean(per["energy"]),
                   object_share=ctx["object_share"])
        by_place = localisation_by_placement(ctx["explainer"], cams, masks, cfg.tolerance)
        per.update(by_place)
        row.update({k: M.nanmean(v) for k, v in by_place.items()})
    timing["localisation"] += time.time() - t0
    row["seconds"] = {k: round(timing[k] - before[k], 3) for k in ("drop_increase", "deletion_insertion",
                                                                    "localisation")}
    return row, per


def _habitat(groups, per_method, correct) -> dict | None:
    if groups is None or "energy" not in next(iter(per_method.values())):
        return None
    tied = groups["tied"]
    out = {"bias": groups["bias"], "tied_images": int(tied.sum()), "untied_images": int((~tied).sum()),
           "accuracy_tied": M.nanmean(correct[tied]) if tied.any() else float("nan"),
           "accuracy_untied": M.nanmean(correct[~tied]) if (~tied).any() else float("nan"), "methods": {}}
    for m, per in per_method.items():
        e = per["energy"]
        out["methods"][m] = {"object_energy": M.nanmean(e), "background_energy": 1 - M.nanmean(e),
                             "object_energy_tied": M.nanmean(e[tied]), "object_energy_untied": M.nanmean(e[~tied])}
    return out


def _sanity(model_path, model, x, targets, kept, methods, cfg, log) -> dict:
    from explicam.evaluate.sanity import SanitySkipped, randomisation_test

    if cfg.sanity_images <= 0:
        return {"skipped": "turned off (--sanity-images 0)"}
    try:
        return randomisation_test(model_path, model.meta, x, targets, {m: kept[m] for m in methods},
                                  {"threads": cfg.threads, "batch_size": 32, "scorecam_topk": cfg.scorecam_topk,
                                   "placement": cfg.placement, "options": cfg.method_options},
                                  {"batch_size": cfg.batch_size}, cfg.seed, log)
    except SanitySkipped as exc:
        log(f"  sanity: skipped: {exc}")
        return {"skipped": str(exc)}


def _log_estimate(rate, n, methods, model, cfg, log) -> None:
    """How many forward passes the evaluation needs and about how long they take."""
    per_image = (len(methods) + 1) * (1 + 2 * (cfg.steps - 1)) + 2
    if "scorecam" in methods:
        per_image += min(cfg.scorecam_topk or model.feature_shape[2], model.feature_shape[2])
    if "rise" in methods:
        from explicam.runtime.methods_perturb import rise_options

        per_image += rise_options(cfg.method_options)[0]
    if "finercam" in methods:
        k = cfg.method_options.get("finercam_k")
        per_image += min(3 if k is None else int(k), model.num_classes - 1)
    total = n * per_image
    log(f"  about {total} forward passes (~{total / rate / 60:.1f} min at {rate:.0f} images/s) before the "
        "sanity test; --limit, --steps, --scorecam-topk and --rise-masks cut it")


def run_evaluation(model_path: str, data: str, cfg: EvalConfig | None = None, out: str | None = None,
                   log=print) -> dict:
    """Evaluate every method of `cfg` on the validation split; write the files; return the results."""
    from explicam.runtime.explainer import Explainer

    cfg = cfg or EvalConfig()
    if cfg.steps < 2 or cfg.batch_size < 1 or (cfg.limit is not None and cfg.limit < 1):
        raise ValueError("--steps must be >= 2, --eval-batch >= 1 and --limit >= 1")
    start, timing = time.time(), {k: 0.0 for k in TIMED}
    out = out or os.path.join(os.path.dirname(os.path.abspath(model_path)), "eval")
    ex = Explainer(model_path, threads=cfg.threads, batch_size=32, scorecam_topk=cfg.scorecam_topk,
                   placement=cfg.placement, options=cfg.method_options, feature_layer=cfg.feature_layer)
    model = ex.model
    methods = list(cfg.methods or default_methods(model.head_kind, model.has_input_grads))
    if not cfg.methods and "cam" not in methods:
        log("  (method 'cam' left out: it needs a global-average-pooling head, this model has "
            f"'{model.head_kind}')")
    unknown = [m for m in methods if m not in ex.methods]
    if unknown and not model.has_input_grads and set(unknown) <= set(INPUT_GRAD_METHODS):
        raise ValueError(f"method '{unknown[0]}' needs input gradients, which this export does not have: "
                         "re-export the model with --input-grads")
    if unknown:
        raise ValueError(f"unknown method '{unknown[0]}'; choose from {', '.join(ex.methods)}")
    plain = model.input_size is not None and not model.resize_shorter  # square, squeezed whole: as ever
    es = load_eval_set(data, model.input_size, cfg.limit, cfg.masks, cfg.boxes,
                       fit=None if plain else model.fit)
    if len(es.class_names) != model.num_classes:
        raise ValueError(f"{data} has {len(es.class_names)} classes but {model_path} was trained on "
                         f"{model.num_classes}: evaluate a model on its own dataset")
    log(f"evaluating {model_path} on {len(es.paths)} validation images of {data} ({len(methods)} methods, "
        f"masks: {es.mask_source})")
    x = model.preprocess(es.images)
    t0 = time.time()
    probs = model.probabilities(x, cfg.batch_size)
    _log_estimate(len(x) / max(time.time() - t0, 1e-6), len(x), methods, model, cfg, log)
    preds = probs.argmax(axis=1)
    targets = preds if cfg.target == "predicted" else es.labels
    idx = np.arange(len(x))
    bases = tuple(M.baseline_images(x, model.value_range, kind) for kind in (cfg.deletion_baseline,
                                                                             cfg.insertion_baseline))
    base_probs = [model.probabilities(b, cfg.batch_size) for b in bases]
    ctx = {"model": model, "explainer": ex, "x": x, "targets": targets, "bases": bases, "masks": es.masks,
           "p_orig": probs[idx, targets].astype(np.float64),
           "p_bases": tuple(p[idx, targets].astype(np.float64) for p in base_probs),
           "object_share": M.nanmean(M.object_share(es.masks)) if es.masks is not None else float("nan")}
    sanity_idx = np.arange(min(cfg.sanity_images, len(x)))  # balanced: the set is in round-robin order
    example_idx = first_per_class(es.labels)
    rows, per_method, kept, examples, example_cams, all_cams = [], {}, {}, {}, {}, {}
    for name in methods + [RANDOM]:
        t0 = time.time()
        if name == RANDOM:
            cams = M.random_cams(len(x), model.feature_shape[:2], cfg.seed)
            heat = ex.heatmaps(cams)
        else:
            heat, cams = _explain_all(ex, x, name, targets, cfg, log)
        spent = time.time() - t0
        timing["explain"] += spent if name != RANDOM else 0.0
        row, per = _score(name, heat, cams, ctx, cfg, timing, log)
        row["placement"] = ex.placement
        row["explain_s"] = round(spent, 3)
        row["seconds"]["explain"] = round(spent, 3)
        rows.append(row)
        per_method[name] = per
        kept[name] = heat[sanity_idx]
        examples[name] = heat[example_idx].astype(np.float16)
        example_cams[name] = cams[example_idx].astype(np.float32)  # to redraw under another placement
        all_cams[name] = cams
        log(f"  {name}: done in {time.time() - t0:.1f}s")
    t0 = time.time()
    effective = effective_localisation(model_path, ex, x, all_cams, rows, per_method, es.masks, cfg, log)
    timing["effective"] = time.time() - t0
    t0 = time.time()
    sanity = _sanity(model_path, model, x[sanity_idx], targets[sanity_idx], kept, methods, cfg, log)
    if "methods" in sanity:  # chance: two independent random map sets
        other = ex.heatmaps(M.random_cams(len(sanity_idx), model.feature_shape[:2], cfg.seed + 1))
        sanity["methods"][RANDOM] = {"chance_rho": round(compare_maps(kept[RANDOM], other)[0], 4)}
    timing["sanity"] = time.time() - t0
    for row in rows:
        s = sanity.get("methods", {}).get(row["method"], {})
        row["sanity_spearman"] = s.get("final_rho", s.get("chance_rho", float("nan")))
        row["sanity_flag"] = "FLAGGED" if s.get("flagged") else ("ok" if "final_rho" in s else "")
    correct = (preds == es.labels).astype(float)
    results = {
        "model": os.path.abspath(model_path), "data": os.path.abspath(data), "kernel": model.kernel,
        "input_size": model.input_size or list(model.input_hw), "head": model.head_kind, "class_names": model.class_names,
        "images": len(x), "placement": ex.placement, "geometry": ex.geometry, "effective": effective,
        "skipped_images": es.skipped,
        "mask_source": es.mask_source,
        "accuracy": float(correct.mean()), "settings": cfg.key(), "methods": methods, "rows": rows,
        "chance": {"object_share": ctx["object_share"], "pointing_game": ctx["object_share"],
                   "energy_pointing_game": ctx["object_share"],
                   "energy_ceiling": M.nanmean(M.energy_pointing_game(M.mask_at_cam_resolution(
                       es.masks, model.feature_shape[:2], ex.k), es.masks)) if es.masks is not None else float("nan")},
        "baselines": {name: {"kind": kind, "mean_probability": float(p[idx, targets].mean()),
                             "keeps_class": float((p.argmax(axis=1) == targets).mean())}
                      for name, kind, p in zip(("deletion", "insertion"), (cfg.deletion_baseline,
                                                                         cfg.insertion_baseline), base_probs)},
        "sanity": sanity, "habitat": _habitat(habitat_groups(es), per_method, correct),
        "counterfactual": counterfactual_accuracy(model, es, preds, cfg.batch_size, log),
        "timing_s": {k: round(v, 2) for k, v in timing.items()}, "total_s": round(time.time() - start, 2),
    }
    _save(out, results, es, per_method, examples, example_idx, preds, probs, example_cams)
    results["out"] = out
    return results


def _save(out, results, es, per_method, examples, example_idx, preds, probs, example_cams=None) -> None:
    os.makedirs(out, exist_ok=True)
    _write_atomic(os.path.join(out, "metrics.csv"), _csv_text(results["rows"], COLUMNS))
    _write_atomic(os.path.join(out, "metrics.json"), json.dumps(json_safe(results), indent=1, allow_nan=False))
    per_rows = []
    for m, per in per_method.items():
        for i, path in enumerate(es.paths):
            per_rows.append({"image": os.path.relpath(path, es.root), "label": int(es.labels[i]),
                             "predicted": int(preds[i]), "method": m, **{k: float(v[i]) for k, v in per.items()}})
    _write_atomic(os.path.join(out, "per_image.csv"),
                  _csv_text(per_rows, list(per_rows[0]) if per_rows else ["image"]))
    tmp = os.path.join(out, "examples.partial.npz")
    np.savez_compressed(tmp, paths=np.array([es.paths[i] for i in example_idx]),
                        labels=es.labels[example_idx], predicted=preds[example_idx],
                        confidence=probs[example_idx].max(axis=1),
                        masks=es.masks[example_idx] if es.masks is not None else np.zeros(0),
                        images=es.images[example_idx], methods=np.array(list(examples)),
                        **{f"heat_{m}": h for m, h in examples.items()},
                        **{f"cam_{m}": c for m, c in (example_cams or {}).items()})
    os.replace(tmp, os.path.join(out, "examples.npz"))


def format_table(results: dict) -> str:
    """The printed summary: one line per method, the random row last."""
    cols = [("method", "method", "{}"), ("avg_drop", "AvgDrop%↓", "{:.1f}"), ("increase_in_confidence", "IncConf%↑",
            "{:.1f}"), ("deletion_auc", "Del↓", "{:.3f}"), ("insertion_auc", "Ins↑", "{:.3f}"),
            ("pointing_game", "Point↑", "{:.3f}"), ("energy_pointing_game", "Energy↑", "{:.3f}")]
    other = "naive" if results.get("placement") != "naive" else "geometric"
    if any(f"pointing_{other}" in r for r in results["rows"]):  # the other placement, side by side
        cols += [(f"pointing_{other}", f"Point {other}", "{:.3f}"), (f"energy_{other}", f"Energy {other}", "{:.3f}")]
    if any("pointing_effective" in r for r in results["rows"]):
        cols += [("pointing_effective", "Point eff.", "{:.3f}"), ("energy_effective", "Energy eff.", "{:.3f}")]
    cols += [("sanity_spearman", "Sanity ρ↓", "{:+.2f}"), ("sanity_flag", "", "{}"),
             ("explain_s", "time s", "{:.1f}")]
    lines = [[h for _, h, _ in cols]]
    for r in results["rows"]:
        cells = []
        for key, _, fmt in cols:
            v = r.get(key, "")
            cells.append("-" if v == "" or (isinstance(v, float) and np.isnan(v)) else fmt.format(v))
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(cols))]
    text = "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths)))
                     for line in lines)
    notes = [f"{results['images']} images, accuracy {results['accuracy']:.1%}, masks: {results['mask_source']}, "
             f"heatmaps placed {placement_text(results)}"]
    if not np.isnan(results["chance"]["object_share"]):
        notes.append(f"chance (uniform map) for Point and Energy: {results['chance']['object_share']:.3f}; "
                     f"Energy of the mask itself at the CAM's resolution: {results['chance']['energy_ceiling']:.3f}")
    notes.append("baselines: " + "; ".join(
        f"{name} {'ends on' if name == 'deletion' else 'starts from'} {b['kind']} images (p = {b['mean_probability']:.2f}"
        f", {b['keeps_class']:.0%} still classified as the explained class)" for name, b in results["baselines"].items()))
    eff = results.get("effective") or {}
    if "stride" in eff:
        notes.append(f"effective centres (mean |d cell / d image|, {eff['images']} images): {eff['stride'][0]:.2f} j + "
                     f"{eff['offset'][0]:.1f} px" + (f", {eff['from_geometric_px'][0]:+.1f} px (y) and "
                     f"{eff['from_geometric_px'][1]:+.1f} px (x) from the geometric centres"
                     if "from_geometric_px" in eff else ""))
    if counterfactual_text(results.get("counterfactual")):
        notes.append(counterfactual_text(results["counterfactual"]))
    if "skipped" in results["sanity"]:
        notes.append(f"sanity: skipped: {results['sanity']['skipped']}")
    notes.append("time per metric: " + ", ".join(f"{k} {v:.1f}s" for k, v in results["timing_s"].items()))
    return text + "\n" + "\n".join(notes)
