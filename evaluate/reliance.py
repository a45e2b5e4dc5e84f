"""Habitat reliance in the report: the causal measurement (evaluate/counterfactual.py)
against what the explanations say (the share of heatmap energy on the background).

Per run: accuracy on the validation images and on their neutral / swapped /
background-only copies. Reliance is the drop from validation to swapped on the same
objects; background evidence is background-only accuracy above chance. Then, per
method, Spearman's ρ across runs between the heatmap's background share and that drop:
if the explanations are right about the habitat, the runs whose maps lean on the
background are the runs that lose most when the habitat changes.
"""
from __future__ import annotations

import math
import os

from explicam.evaluate import stats
from explicam.evaluate.scatter import svg_scatter


def _num(v) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else float("nan")


def _cf(e):
    cf = e["results"].get("counterfactual")
    return cf if cf and cf.get("sets") else None


def _name(e) -> str:
    return str(e.get("run_dir") or f"k{e['kernel']}")


def background_energy(e, method: str) -> float:
    row = next((r for r in e["results"]["rows"] if r["method"] == method), {})
    return 1.0 - _num(row.get("energy_pointing_game"))


def _acc(cf, which) -> float:
    return _num(cf["sets"].get(which, {}).get("accuracy"))


def _pct(v) -> str:
    return f"{v:.1%}" if math.isfinite(v) else "-"


def _rho(v) -> str:
    return f"{v:+.2f}" if math.isfinite(v) else "-"


def run_table(runs):
    head = ["run", "habitat bias", "colour cue", "kernel", "image size", "validation (same objects)", "neutral",
            "swapped", "drop to swapped (points)", "swapped following the habitat", "background only", "chance"]
    rows = []
    for e in runs:
        cf = _cf(e)
        sw = cf["sets"].get("swapped", {})
        rows.append([_name(e), f"{cf['bias']:g}", f"{cf.get('colour_cue', 1.0):g}", e["kernel"],
                     f"{e['results']['input_size']} px", _pct(_num(sw.get("validation_accuracy"))),
                     _pct(_acc(cf, "neutral")), _pct(_acc(cf, "swapped")),
                     f"{100 * _num(cf.get('drop_swapped')):+.1f}", _pct(_num(sw.get("follows_habitat"))),
                     _pct(_acc(cf, "background-only")), _pct(cf["chance"])])
    return ("table", head, rows, None)


def method_table(runs):
    """Per habitat bias, kernel and method: mean background energy beside the mean measured drop."""
    cells: dict = {}
    for e in runs:
        cf = _cf(e)
        for m in e["results"]["methods"]:
            cells.setdefault((cf["bias"], e["kernel"], m), []).append(
                (background_energy(e, m), _num(cf.get("drop_swapped")), _num(cf.get("background_above_chance"))))
    rows = []
    for (bias, kernel, m), vals in sorted(cells.items()):
        be, drop, bg = (stats.mean_std([v[i] for v in vals])[0] for i in range(3))
        rows.append([f"{bias:g}", kernel, m, f"{be:.3f}", f"{100 * drop:+.1f}", f"{100 * bg:+.1f}", len(vals)])
    return ("table", ["habitat bias", "kernel", "method", "energy on background, mean", "drop to swapped, mean "
                      "(points)", "background only above chance, mean (points)", "runs"], rows, None)


def correlations(runs) -> dict:
    """method -> {"drop": ρ, "background": ρ, "runs": n} across runs."""
    methods = list(dict.fromkeys(m for e in runs for m in e["results"]["methods"]))
    out = {}
    for m in methods:
        have = [e for e in runs if m in e["results"]["methods"]]
        be = [background_energy(e, m) for e in have]
        out[m] = {"drop": stats.spearman(be, [_num(_cf(e).get("drop_swapped")) for e in have]),
                  "background": stats.spearman(be, [_num(_cf(e).get("background_above_chance")) for e in have]),
                  "runs": len(have)}
    return out


def uniform_background(runs) -> float:
    """The background's share of the image (what a uniform heatmap puts there), mean over runs."""
    return stats.mean_std([1.0 - _num((e["results"].get("chance") or {}).get("object_share")) for e in runs])[0]


def _share(v) -> str:
    return f"{v:.0%}" if math.isfinite(v) else "-"


def _verdict(rho: float) -> str:
    if not math.isfinite(rho):
        return "cannot be told (too few runs, or no spread)"
    if rho >= 0.5:
        return "the explanations agree with the causal measurement"
    if rho >= 0.2:
        return "they agree only weakly"
    return "the explanations do not track the measured reliance"


def findings(runs, corr) -> list:
    lines = []
    by_bias: dict = {}
    for e in runs:
        by_bias.setdefault(_cf(e)["bias"], []).append(e)
    for bias, group in sorted(by_bias.items()):
        kernels: dict = {}
        for e in group:
            kernels.setdefault(e["kernel"], []).append(e)
        parts = []
        for k, es in sorted(kernels.items()):
            drop = stats.mean_std([_num(_cf(e).get("drop_swapped")) for e in es])[0]
            parts.append(f"{100 * drop:.1f} points for kernel {k}")
        worst = max(group, key=lambda e: _num(_cf(e).get("drop_swapped")))
        wcf = _cf(worst)
        text = (f"Habitat, measured (bias {bias:g}): putting the same objects on another class's habitat costs "
                f"{', '.join(parts)} of validation accuracy (mean over runs; a negative cost is a gain).")
        if _num(wcf.get("drop_swapped")) > 0:
            text += (f" The largest loss is {100 * _num(wcf.get('drop_swapped')):.1f} points in {_name(worst)}, whose "
                     f"background alone, object removed, is still classified right "
                     f"{_pct(_acc(wcf, 'background-only'))} of the time (chance {_pct(wcf['chance'])}).")
        else:
            text += " No run loses accuracy: these networks read the object, not its habitat."
        lines.append(text)
    uniform = uniform_background(runs)
    for m, c in corr.items():
        share = stats.mean_std([background_energy(e, m) for e in runs if m in e["results"]["methods"]])[0]
        lines.append(f"Habitat, explained ({m}): across {c['runs']} runs the share of {m}'s heatmap energy on the "
                     f"background ranks the measured drop with Spearman ρ = {_rho(c['drop'])} (and background-only "
                     f"accuracy above chance with ρ = {_rho(c['background'])}): {_verdict(c['drop'])}. On average "
                     f"{_share(share)} of its energy is on the background, where a uniform map puts "
                     f"{_share(uniform)}.")
    return lines


def blocks_and_findings(entries, fig_dir: str):
    runs = [e for e in entries if _cf(e)]
    if not runs:
        return [], []
    corr = correlations(runs)
    method = runs[0]["results"]["methods"][0]
    rows = [[m, c["runs"], _rho(c["drop"]), _rho(c["background"])] for m, c in corr.items()]
    blocks = [("h2", "Habitat reliance, measured and explained"),
              ("p", "The dataset's counterfactual validation sets hold the same objects as the validation split: on a "
                    "background style no class uses (neutral), on another class's habitat (swapped), and the "
                    "background with the object removed (background only). A network that reads the object scores "
                    "the same on all of them and the background alone at chance; one that reads the habitat loses "
                    "accuracy on swapped, follows the new habitat, and classifies the empty background above chance."),
              run_table(runs), method_table(runs),
              ("p", "Does the heatmap say so? Spearman's ρ across runs between each method's share of energy on the "
                    "background (validation images) and the measured reliance: positive when the runs whose maps "
                    "lean on the background are the ones that need it. A uniform map puts "
                    f"{_share(uniform_background(runs))} of its energy on the background (the background's share of "
                    "the image)."),
              ("table", ["method", "runs", "ρ with the drop to swapped", "ρ with background-only above chance"],
               rows, None),
              ("img", "figures/reliance.svg", f"{method}: energy on background against the drop to swapped, every run")]
    pts: dict = {}
    for e in runs:
        pts.setdefault(f"bias {_cf(e)['bias']:g}", []).append((background_energy(e, method),
                                                               _num(_cf(e).get("drop_swapped"))))
    os.makedirs(fig_dir, exist_ok=True)
    svg = svg_scatter(pts, "Heatmap on the background vs measured reliance", f"{method} energy on background",
                      "accuracy lost on swapped")
    with open(os.path.join(fig_dir, "reliance.svg.partial"), "w", encoding="utf-8") as f:
        f.write(svg)
    os.replace(os.path.join(fig_dir, "reliance.svg.partial"), os.path.join(fig_dir, "reliance.svg"))
    return blocks, findings(runs, corr)
