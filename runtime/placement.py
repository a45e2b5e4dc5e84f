"""Where a heatmap's cells are drawn on the input: the placements an Explainer offers.

  geometric  each feature cell at the centre of its receptive field, from the `geometry`
             the export computed from the graph (export/geometry.py) and wrote into the
             model file's metadata. The default when the file has it.
  naive      the feature map stretched over the input (plain bilinear, as pytorch-grad-cam
             and keras.io do): cell j at (j + 0.5) * S / h - 0.5. The default for older
             exports without geometry, and the comparison in `evaluate`.
  effective  not offered by name yet: it needs the measured centre of each cell's influence
             on the input (|d cell / d image|), i.e. input gradients the export does not
             write yet. `evaluate` measures it with TensorFlow and model.keras
             (evaluate/effective.py) and passes the fitted map as a geometry dict.
A geometry dict ({"stride": [sy, sx], "offset": [oy, ox]}) is accepted in place of a name.
A map at the input's own resolution (RISE) is not moved by any placement.
Pixel p is centred at coordinate p; cell j at stride * j + offset (both per axis, y then x).
"""
from __future__ import annotations

PLACEMENTS = ("geometric", "naive")


class PlacementError(ValueError):
    pass


def model_geometry(meta: dict) -> dict | None:
    """The export's geometry, or None for an older file (or one whose path could not be followed)."""
    g = meta.get("geometry")
    return g if isinstance(g, dict) and "stride" in g and "offset" in g else None


def resolve(requested, geometry: dict | None):
    """The placement to use: a name of PLACEMENTS, or a geometry dict given by the caller.
    None / "auto": geometric when the file has geometry, else naive (silently)."""
    if isinstance(requested, dict):
        if "stride" not in requested or "offset" not in requested:
            raise PlacementError("a placement dict needs 'stride' and 'offset' ([y, x] each)")
        return requested
    if requested in (None, "auto"):
        return "geometric" if geometry is not None else "naive"
    if requested == "effective":
        raise PlacementError("placement 'effective' needs input gradients, which this export does not have; "
                             "use geometric or naive")
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
