"""Where a heatmap's cells are drawn on the input: the placements an Explainer offers.

  geometric  each feature cell at the centre of its receptive field, from the `geometry`
             the export computed from the graph (export/geometry.py) and wrote into the
             model file's metadata. The default when the file has it.
  naive      the feature map stretched over the input (plain bilinear, as pytorch-grad-cam
             and keras.io do): cell j at (j + 0.5) * S / h - 0.5. The default for older
             exports without geometry, and the comparison in `evaluate`.
  effective  each cell at the measured centre of its influence on the input (mean position
             of |d cell / d image| over a few images, fitted as stride j + offset): offered
             when the export measured it (`export --input-grads` writes `effective_geometry`,
             export/input_grads.py); `evaluate` measures it again on its own images
             (evaluate/effective.py) and passes the fitted map as a geometry dict.
A geometry dict ({"stride": [sy, sx], "offset": [oy, ox]}) is accepted in place of a name.
A map at the input's own resolution (RISE) is not moved by any placement.
Pixel p is centred at coordinate p; cell j at stride * j + offset (both per axis, y then x).
"""
from __future__ import annotations

PLACEMENTS = ("geometric", "naive", "effective")


class PlacementError(ValueError):
    pass


def model_geometry(meta: dict) -> dict | None:
    """The export's geometry, or None for an older file (or one whose path could not be followed)."""
    g = meta.get("geometry")
    return g if isinstance(g, dict) and "stride" in g and "offset" in g else None


def model_effective(meta: dict) -> dict | None:
    """The export's measured effective placement (export --input-grads), or None."""
    g = meta.get("effective_geometry")
    return g if isinstance(g, dict) and "stride" in g and "offset" in g else None


def resolve(requested, geometry: dict | None, effective: dict | None = None):
    """The placement to use: a name of PLACEMENTS, or a geometry dict given by the caller.
    None / "auto": geometric when the file has geometry, else naive (silently). "effective"
    comes back as the measured geometry dict itself (`effective`, model_effective)."""
    if isinstance(requested, dict):
        if "stride" not in requested or "offset" not in requested:
            raise PlacementError("a placement dict needs 'stride' and 'offset' ([y, x] each)")
        return requested
    if requested in (None, "auto"):
        return "geometric" if geometry is not None else "naive"
    if requested == "effective":
        if effective is None:
            raise PlacementError("placement 'effective' needs the measured effective centres, which the export "
                                 "writes with input gradients (re-export with --input-grads; for the primary "
                                 "feature layer only); use geometric or naive")
        return {"stride": list(effective["stride"]), "offset": list(effective["offset"]), "name": "effective"}
    if requested not in PLACEMENTS:
        raise PlacementError(f"unknown placement {requested!r}; choose from {', '.join(PLACEMENTS)}")
    if requested == "geometric" and geometry is None:
        raise PlacementError("this model file has no receptive-field geometry in its metadata (exported before "
                             "explicam 0.x, or its graph could not be followed); re-export it or use --placement naive")
    return requested


def params(placement, geometry: dict | None, input_hw, feature_hw) -> tuple[float, float, float, float]:
    """(stride_y, offset_y, stride_x, offset_x) of camkernels.upsample_placed. A map already
    at the input's resolution (RISE draws its maps on the input, pixel by pixel) is placed
    as it is, whatever the placement: stride 1, offset 0, the identity."""
    if tuple(feature_hw) == tuple(input_hw):
        return 1.0, 0.0, 1.0, 0.0
    if placement == "naive":
        (H, W), (h, w) = input_hw, feature_hw
        sy, sx = H / h, W / w
        return sy, (sy - 1) / 2, sx, (sx - 1) / 2
    g = placement if isinstance(placement, dict) else geometry
    (sy, sx), (oy, ox) = g["stride"], g["offset"]
    return float(sy), float(oy), float(sx), float(ox)
