"""Localisation under each placement of the heatmap, side by side (runtime/placement.py).

This release moves heatmaps from the naive stretch to each cell's receptive-field centre
(export/geometry.py); `evaluate` scores pointing and energy under both, and under the
measured effective centres (the ONNX graph differentiated per cell, or TensorFlow; evaluate/effective.py),
so the change in every localisation figure is visible.
"""
from __future__ import annotations

from explicam.evaluate import metrics as M

COMPARED = ("naive", "geometric")


def localisation_by_placement(ex, cams, masks, tolerance) -> dict:
    """Pointing and energy under each placement of COMPARED the model offers (per image)."""
    offered = [p for p in COMPARED if p == "naive" or ex.geometry is not None]
    out = {}
    for place in offered:
        heat = ex.heatmaps(cams, place)
        out[f"pointing_{place}"] = M.pointing_game(heat, masks, tolerance)
        out[f"energy_{place}"] = M.energy_pointing_game(heat, masks)
    return out


def effective_localisation(model_path, ex, x, all_cams, rows, per_method, masks, cfg, log) -> dict:
    """Measure each cell's effective centre and score localisation under it (evaluate/effective.py)."""
    from explicam.evaluate.effective import EffectiveSkipped, measure_effective

    if cfg.effective_images <= 0:
        return {"skipped": "turned off (effective_images 0)"}
    try:
        eff = measure_effective(model_path, ex.model.meta, x[:cfg.effective_images], ex.geometry,
                                getattr(ex, "layer", {}).get("features", "features"))
    except EffectiveSkipped as exc:
        log(f"  effective centres: skipped: {exc}")
        return {"skipped": str(exc)}
    log(f"  effective centres ({eff['images']} images): {eff['stride'][0]:.2f} j + {eff['offset'][0]:.1f} px (y), "
        f"{eff['stride'][1]:.2f} j + {eff['offset'][1]:.1f} px (x)")
    if masks is not None:
        for row in rows:
            heat = ex.heatmaps(all_cams[row["method"]], eff)
            per = {"pointing_effective": M.pointing_game(heat, masks, cfg.tolerance),
                   "energy_effective": M.energy_pointing_game(heat, masks)}
            per_method[row["method"]].update(per)
            row.update({k: M.nanmean(v) for k, v in per.items()})
    return eff


def placement_text(results: dict) -> str:
    place, g = results.get("placement", "naive"), results.get("geometry")
    if place == "geometric" and g:
        return (f"at each cell's receptive-field centre ({g['stride'][0]:g} j + {g['offset'][0]:g} px; "
                "--placement naive stretches the map)")
    if isinstance(place, dict):   # the export's measured effective centres, or a map given by the caller
        return (f"at each cell's {place.get('name', 'given')} centre ({place['stride'][0]:.2f} j + "
                f"{place['offset'][0]:.1f} px)")
    return "by stretching the map (naive)" if place == "naive" else f"by {place}"
