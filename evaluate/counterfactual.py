"""Habitat reliance, measured causally on the built-in dataset's counterfactual sets.

`dataset synth --habitat-bias P` writes three copies of the validation split from the
very same objects (train/synth.py): `neutral` (the object on a background style no class
uses), `swapped` (on another class's habitat) and `background-only` (the object removed,
the habitat kept). A model that reads the object classifies all of them as it does the
validation images (and the background alone at chance); a model that reads the habitat
loses accuracy on `swapped`, following the new habitat instead, and classifies the
background alone above chance. Two numbers come out of it:

    reliance (drop)       validation accuracy - swapped accuracy, on the same objects
    background evidence   background-only accuracy - chance (1 / classes)

The images evaluated are the counterparts of the evaluation's own validation images
(the same --limit prefix), so every difference is between the same objects.
"""
from __future__ import annotations

import json
import os

import numpy as np

from explicam.runtime.images import ImageError, read_image


def _meta(root: str) -> dict | None:
    try:
        with open(os.path.join(root, "dataset.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    return meta if meta.get("counterfactual", {}).get("images") else None


def _predict(model, images, batch_size) -> np.ndarray:
    """Top-1 class of photos of any size: model.preprocess fits each as the model's metadata says."""
    return model.probabilities(model.preprocess(images), batch_size).argmax(axis=1)


def counterfactual_accuracy(model, eval_set, preds, batch_size: int = 128, log=print) -> dict | None:
    """Accuracy on each counterfactual set for the evaluated validation images; None
    when the dataset has no counterfactual sets."""
    meta = _meta(eval_set.root)
    if meta is None:
        return None
    cf = meta["counterfactual"]
    records = {r["file"]: r for r in cf["images"]}
    rel = [os.path.relpath(p, eval_set.root).replace(os.sep, "/") for p in eval_set.paths]
    labels = np.asarray(eval_set.labels)
    chance = 1.0 / len(eval_set.class_names)
    out = {"bias": float(meta.get("habitat_bias") or 0.0), "colour_cue": float(meta.get("colour_cue", 1.0)),
           "chance": chance, "sets": {}}
    for which in cf["sets"]:
        picked, images = [], []
        for i, r in enumerate(rel):
            name = f"{cf['folder']}/{which}/{r.split('/', 1)[1]}" if r.startswith("validation/") else None
            if name not in records:
                continue
            try:
                images.append(read_image(os.path.join(eval_set.root, name), min_side=max(model.input_hw)))
            except ImageError as exc:
                log(f"  counterfactual {which}: skipped {exc}")
                continue
            picked.append((i, records[name]))
        if not picked:
            continue
        idx = np.array([i for i, _ in picked])
        pred = _predict(model, images, batch_size)
        habitat = np.array([-1 if rec["habitat_class"] is None else rec["habitat_class"] for _, rec in picked])
        has_habitat = habitat >= 0
        out["sets"][which] = {
            "images": len(idx), "accuracy": float((pred == labels[idx]).mean()),
            "validation_accuracy": float((preds[idx] == labels[idx]).mean()),  # the same objects, as photographed
            "follows_habitat": float((pred[has_habitat] == habitat[has_habitat]).mean()) if has_habitat.any()
            else float("nan")}
    if "swapped" in out["sets"]:
        s = out["sets"]["swapped"]
        out["drop_swapped"] = s["validation_accuracy"] - s["accuracy"]
    if "background-only" in out["sets"]:
        out["background_above_chance"] = out["sets"]["background-only"]["accuracy"] - chance
    return out


def counterfactual_text(cf: dict | None) -> str | None:
    """One line for the printed summary of `evaluate`."""
    if not cf or not cf.get("sets"):
        return None
    parts = [f"{name} {v['accuracy']:.1%}" for name, v in cf["sets"].items()]
    line = f"counterfactual sets (habitat bias {cf['bias']:g}): accuracy " + ", ".join(parts)
    if "drop_swapped" in cf:
        sw = cf["sets"]["swapped"]
        line += (f"; the same objects: validation {sw['validation_accuracy']:.1%} -> swapped {sw['accuracy']:.1%} "
                 f"({100 * cf['drop_swapped']:.1f} points lost; {sw['follows_habitat']:.0%} follow the new habitat)")
    if "background_above_chance" in cf:
        bg = cf["sets"]["background-only"]["accuracy"]
        line += (f"; the background alone is classified right {bg:.1%}, {100 * cf['background_above_chance']:+.1f} "
                 f"points from chance ({cf['chance']:.1%})")
    return line
