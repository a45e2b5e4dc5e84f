"""Built-in synthetic image-classification dataset, with ground-truth object masks.

No real dataset can be downloaded, so explicam draws its own (train/synth_draw.py). Each
image holds one object (a class = shape + colour family + texture) at a random position,
scale and rotation, over one of ten procedural backgrounds with small clutter behind it.
Because we draw the object we know exactly which pixels are the object, so every
image ships with a mask that class activation maps can be scored against.

Layout (Keras' image_dataset_from_directory convention, plus masks):
    out_dir/training/<class>/000123.jpg    out_dir/masks/training/<class>/000123.png
    out_dir/validation/<class>/000045.jpg  out_dir/masks/validation/<class>/000045.png
    out_dir/dataset.json                   parameters, counts and per-image records
With --habitat-bias P > 0 (or counterfactuals=True), three copies of the validation
split, drawn from the very same objects, answer whether a model reads the object or
its habitat (the background style tied to its class):
    out_dir/counterfactual/neutral/<class>/000045.jpg          on a style no class uses
    out_dir/counterfactual/swapped/<class>/000045.jpg          on another class's habitat
    out_dir/counterfactual/background-only/<class>/000045.jpg  the object removed
with masks under out_dir/masks/counterfactual/<set>/ (the object where it was; empty
for background-only). Other commands read only training/ and validation/.
"""
from __future__ import annotations

import json
import numbers
import os
import shutil
import time
from dataclasses import dataclass

import cv2
import numpy as np

from explicam.train.dataset_files import prepare_target, publish, remove_path, write_rgb
from explicam.train.synth_draw import (BACKGROUND_STYLES, CLASS_HUES, CLASS_NAMES, CLASS_TEXTURES,  # noqa: F401
                                       MAX_SCALE, MIN_SCALE, NEUTRAL_INDEX, NEUTRAL_STYLE, SPLITS, Variant, render)

COUNTERFACTUAL_SETS = ("neutral", "swapped", "background-only")
COUNTERFACTUAL_DIR = "counterfactual"
# Extra seed words of the side generators (the image's own generator is [seed, split, index]).
_COLOUR_STREAM, _NEUTRAL_STREAM, _SWAP_STREAM = 1, 2, 3


@dataclass(frozen=True)
class SynthSpec:
    """What every image of one dataset is drawn with."""
    size: int
    num_classes: int
    habitat_bias: float
    colour_cue: float
    seed: int
    quality: int


def _check_int(name, value, lo, hi=None):
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not ok or value < lo or (hi is not None and value > hi):
        span = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be an integer {span}, got {value!r}")


def _check_share(name, value):
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0 <= value <= 1:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")


def _check_args(n_train, n_val, spec: SynthSpec, progress):
    _check_int("num_classes", spec.num_classes, 2, len(CLASS_NAMES))
    # Every class needs a folder in both splits, or Keras would number classes differently.
    _check_int("n_train", n_train, spec.num_classes)
    _check_int("n_val", n_val, spec.num_classes)
    _check_int("size", spec.size, 32, 4096)
    _check_int("seed", spec.seed, 0)
    _check_int("quality", spec.quality, 1, 100)
    _check_share("habitat_bias", spec.habitat_bias)
    _check_share("colour_cue", spec.colour_cue)
    if progress is not None and not callable(progress):
        raise ValueError(f"progress must be callable or None, got {progress!r}")


def _class_counts(total, k):
    """Split `total` as evenly as possible over k classes, remainder to the first ones."""
    return [total // k + (c < total % k) for c in range(k)]


def _rng(spec: SynthSpec, split: str, index: int, stream: int = 0):
    """Image `index` of `split` is drawn from [seed, split, index]: independent of order and
    of other images. A side stream (colour, counterfactual background) appends one word."""
    words = [spec.seed, SPLITS.index(split), index] + ([stream] if stream else [])
    return np.random.default_rng(np.random.SeedSequence(words))


def _free_hue(spec: SynthSpec, split: str, index: int):
    """With probability 1 - colour_cue, a hue drawn independently of the class (else None).
    At colour_cue 1 (the default) nothing is drawn: the images are today's, bit for bit."""
    if spec.colour_cue >= 1:
        return None
    side = _rng(spec, split, index, _COLOUR_STREAM)
    return float(side.uniform(0, 360)) if side.random() >= spec.colour_cue else None


def _draw(spec: SynthSpec, split: str, index: int, label: int, variant: Variant | None = None):
    return render(_rng(spec, split, index), label, spec.size, spec.habitat_bias,
                  _free_hue(spec, split, index), variant)


def _save(root, file, mask_file, img, mask, quality):
    write_rgb(root, file, img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    write_rgb(root, mask_file, mask)


def _write_split(root, split, counts, spec: SynthSpec, tick):
    """Write one split's images and masks; return their per-image records."""
    records, index = [], 0
    for label, count in enumerate(counts):
        name = CLASS_NAMES[label]
        os.makedirs(os.path.join(root, split, name))
        os.makedirs(os.path.join(root, "masks", split, name))
        for _ in range(count):
            img, mask, style, bbox = _draw(spec, split, index, label)
            stem = f"{index:06d}"
            file, mask_file = f"{split}/{name}/{stem}.jpg", f"masks/{split}/{name}/{stem}.png"
            _save(root, file, mask_file, img, mask, spec.quality)
            records.append({"file": file, "mask": mask_file, "split": split, "label": label,
                            "class": name, "background_style": style, "bbox": bbox})
            index += 1
            tick()
    return records


def counterfactual_variant(spec: SynthSpec, which: str, index: int, label: int) -> Variant:
    """The departure of counterfactual set `which` for validation image `index`."""
    if which == "neutral":
        return Variant(style=NEUTRAL_INDEX, rng=_rng(spec, "validation", index, _NEUTRAL_STREAM))
    if which == "swapped":  # the habitat of another class, chosen per image
        side = _rng(spec, "validation", index, _SWAP_STREAM)
        other = (label + 1 + int(side.integers(spec.num_classes - 1))) % spec.num_classes
        return Variant(style=other, rng=side)
    if which == "background-only":
        return Variant(remove_object=True)
    raise ValueError(f"unknown counterfactual set {which!r}; one of {', '.join(COUNTERFACTUAL_SETS)}")


def _write_counterfactuals(root, val_records, spec: SynthSpec, tick):
    """The three counterfactual copies of every validation image; their records."""
    records = []
    for which in COUNTERFACTUAL_SETS:
        for name in CLASS_NAMES[:spec.num_classes]:
            os.makedirs(os.path.join(root, COUNTERFACTUAL_DIR, which, name))
            os.makedirs(os.path.join(root, "masks", COUNTERFACTUAL_DIR, which, name))
        for rec in val_records:
            index, label = int(os.path.basename(rec["file"])[:-4]), rec["label"]
            img, mask, style, _ = _draw(spec, "validation", index, label,
                                        counterfactual_variant(spec, which, index, label))
            rel = rec["file"].split("/", 1)[1]  # <class>/<stem>.jpg
            file = f"{COUNTERFACTUAL_DIR}/{which}/{rel}"
            mask_file = f"masks/{COUNTERFACTUAL_DIR}/{which}/{rel[:-4]}.png"
            _save(root, file, mask_file, img, mask, spec.quality)
            records.append({"file": file, "mask": mask_file, "set": which, "source": rec["file"],
                            "label": label, "class": rec["class"], "background_style": style,
                            "habitat_class": style if style < spec.num_classes else None,
                            "object": which != "background-only", "bbox": rec["bbox"]})
            tick()
    return records


def generate(out_dir, n_train=1096, n_val=272, size=224, num_classes=10, habitat_bias=0.0,
             seed=0, quality=92, progress=None, force=False, colour_cue=1.0, counterfactuals=None) -> dict:
    """Generate the synthetic dataset into out_dir (see the module docstring for the layout).

    habitat_bias: probability that an image's background style is the one tied to its
    class (style index = class index), a deliberate spurious cue. colour_cue: probability
    that the object wears its class's colour; otherwise its hue is drawn independently of
    the class, so shape and texture must carry it (1: every object, today's images bit
    for bit; 0: colour says nothing). counterfactuals: write the three counterfactual
    validation sets (default: when habitat_bias > 0). force: replace a non-empty out_dir.
    progress: optional callable(done, total) called per image.
    Returns {"out_dir", "n_train", "n_val", "classes", "seconds", "counterfactual"}.
    """
    spec = SynthSpec(size, num_classes, habitat_bias, colour_cue, seed, quality)
    _check_args(n_train, n_val, spec, progress)
    # Plain Python numbers from here on (numpy ints would not serialise to JSON).
    n_train, n_val = int(n_train), int(n_val)
    spec = SynthSpec(int(size), int(num_classes), float(habitat_bias), float(colour_cue), int(seed), int(quality))
    with_cf = spec.habitat_bias > 0 if counterfactuals is None else bool(counterfactuals)
    start = time.perf_counter()
    out_dir = os.path.abspath(os.fspath(out_dir))
    prepare_target(out_dir, force)
    partial = out_dir + ".partial"
    remove_path(partial)  # leftovers of an interrupted run
    counts = {"training": _class_counts(n_train, spec.num_classes),
              "validation": _class_counts(n_val, spec.num_classes)}
    total, done = n_train + n_val * (1 + len(COUNTERFACTUAL_SETS) * with_cf), 0

    def tick():
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)
    try:
        records = []
        for split in SPLITS:
            records += _write_split(partial, split, counts[split], spec, tick)
        names = CLASS_NAMES[:spec.num_classes]
        meta = {"generator": "explicam synth", "format_version": 1, "seed": spec.seed,
                "size": spec.size, "num_classes": spec.num_classes, "class_names": names,
                "n_train": n_train, "n_val": n_val, "habitat_bias": spec.habitat_bias,
                "colour_cue": spec.colour_cue, "quality": spec.quality,
                "counts": {s: dict(zip(names, c)) for s, c in counts.items()},
                "class_textures": CLASS_TEXTURES[:spec.num_classes],
                "background_styles": BACKGROUND_STYLES, "images": records}
        if with_cf:
            val = [r for r in records if r["split"] == "validation"]
            meta["counterfactual"] = {"sets": list(COUNTERFACTUAL_SETS), "folder": COUNTERFACTUAL_DIR,
                                      "neutral_style": NEUTRAL_STYLE, "neutral_index": NEUTRAL_INDEX,
                                      "images": _write_counterfactuals(partial, val, spec, tick)}
        with open(os.path.join(partial, "dataset.json"), "w") as f:
            json.dump(meta, f, indent=1)
        publish(partial, out_dir)  # only now, so a failed run leaves the old dataset alone
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return {"out_dir": out_dir, "n_train": n_train, "n_val": n_val, "classes": list(names),
            "seconds": round(time.perf_counter() - start, 3),
            "counterfactual": list(COUNTERFACTUAL_SETS) if with_cf else []}
