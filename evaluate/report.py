"""The kernel-size report: report/index.html and report/report.md, figures beside them.

The document is built once as a list of blocks (headings, paragraphs, tables, figures)
and rendered twice, to HTML (plain CSS, no script, nothing from the network: it opens
from file://) and to Markdown. Every number and figure comes from the runs' own files:
summary.json and history.csv (training), eval/metrics.json and eval/examples.npz
(evaluate.evaluate), curves.png (train.fit).
"""
from __future__ import annotations

import html
import math
import os
import shutil
import time

import numpy as np

from explicam.evaluate import figures, study
from explicam.runtime.overlay import save_png

FILTERS = (16, 32, 64, 128, 256)
CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:13px}th,td{border:1px solid #ccc;padding:3px 7px;
text-align:right}th{background:#f1f1f1}td:first-child,th:first-child{text-align:left}tr.chance td{color:#777;
font-style:italic}img{max-width:100%;border:1px solid #ddd;margin:.3em 0}.note{color:#555;font-size:13px}
details{margin:.5em 0 1em}code{background:#f4f4f4;padding:0 3px}"""


def receptive_field(kernel: int, convs: int = len(FILTERS)) -> int:
    """Theoretical receptive field (px) of the last convolution of the seed network:
    stride-1 KxK convolutions each followed (except the last) by 2x2/2 pooling;
    r += (k - 1) * jump per layer, jump doubles at each pooling: 31 K - 15 for five convs."""
    r, jump = 1, 1
    for i in range(convs):
        r += (kernel - 1) * jump
        if i < convs - 1:
            r += jump
            jump *= 2
    return r


def _num(v) -> float:
    """A metric as a float; missing (None in JSON, absent) -> NaN."""
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else float("nan")


def _fmt(v, fmt="{:.3f}"):
    if v is None or v == "" or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return fmt.format(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


# ---------------------------------------------------------------- blocks
PLACES = ("naive", "geometric")


def _headline(e) -> dict:
    """The row of the kernel's first method (the one the seed table and the pictures show)."""
    method = e["results"]["methods"][0]
    return next(r for r in e["results"]["rows"] if r["method"] == method)


def _shift(e) -> float:
    """How far (px, along y) geometric placement puts cells from where the naive stretch draws them."""
    g = e["results"].get("geometry")
    if not g or not g.get("feature_size") or not g["feature_size"][0] or not g["input_size"][0]:
        return float("nan")
    naive_stride = g["input_size"][0] / g["feature_size"][0]
    return g["offset"][0] - (naive_stride - 1) / 2


def _effective_table(entries) -> list:
    """Per kernel: the geometric map, the measured effective one and how far apart they are."""
    rows = []
    for e in entries:
        g, eff, r = e["results"].get("geometry"), e["results"].get("effective") or {}, _headline(e)
        if not g or "stride" not in eff:
            continue
        rows.append([e["kernel"], f"{g['stride'][0]:g} j + {g['offset'][0]:g}",
                     f"{eff['stride'][0]:.2f} j + {eff['offset'][0]:.1f} (y), {eff['stride'][1]:.2f} j + "
                     f"{eff['offset'][1]:.1f} (x)",
                     ", ".join(f"{v:+.1f}" for v in eff.get("from_geometric_px", [])) or "-",
                     _fmt(r.get("energy_effective")), _fmt(r.get("pointing_effective"))])
    if not rows:
        return []
    n = next(e["results"]["effective"]["images"] for e in entries if "stride" in (e["results"].get("effective") or {}))
    method = entries[0]["results"]["methods"][0]
    return [("p", f"Effective centres: the mean position of |d cell / d image| over {n} validation images "
                  "(TensorFlow, model.keras), fitted as stride * j + offset over the inner cells; the theoretical "
                  "field is a bound, the trained weights decide where inside it a cell looks (Luo et al. 2016)."),
            ("table", ["kernel", "geometric centre (px)", "effective centre (px)",
                       "effective - geometric, inner cells (y, x px)", f"{method} energy, effective",
                       f"{method} pointing, effective"], rows, None)]


def _seed_table(entries, size):
    method = entries[0]["results"]["methods"][0]
    head = ["kernel", "epochs run", "best epoch", "wall time", "final val. accuracy", "best val. accuracy",
            "parameters", "receptive field of conv4", "RF / image side", "geometric - naive (px)"]
    head += [f"{method} {what} {p}" for what in ("energy", "pointing") for p in PLACES]
    rows = []
    for e in entries:
        s, rf, r = e["summary"], receptive_field(e["kernel"]), _headline(e)
        rows.append([f"{e['kernel']}x{e['kernel']}", f"{s['epochs_run']}/{s['max_epochs']}", s["best_epoch"],
                     s.get("wall_time", f"{s['wall_time_s']:.0f}s"), f"{s['final_val_accuracy']:.2%}",
                     f"{s['best_val_accuracy']:.2%}", f"{s['params']:,}", f"{rf} px",
                     f"{rf / e['results'].get('input_size', size):.2f}",
                     _fmt(_shift(e), "{:+.1f}")]
                    + [_fmt(r.get(f"{what}_{p}")) for what in ("energy", "pointing") for p in PLACES])
    return ("table", head, rows, None)


METRIC_COLS = [("avg_drop", "Avg Drop % ↓", "{:.1f}"), ("increase_in_confidence", "Incr. Conf. % ↑", "{:.1f}"),
               ("deletion_auc", "Deletion AUC ↓", "{:.3f}"), ("insertion_auc", "Insertion AUC ↑", "{:.3f}"),
               ("pointing_game", "Pointing ↑", "{:.3f}"), ("energy_pointing_game", "Energy on object ↑", "{:.3f}"),
               ("pointing_naive", "Pointing, naive", "{:.3f}"), ("energy_naive", "Energy, naive", "{:.3f}"),
               ("sanity_spearman", "Sanity ρ ↓", "{:+.2f}"), ("sanity_flag", "sanity", "{}")]


def _metric_table(entries):
    head = ["kernel", "method"] + [h for _, h, _ in METRIC_COLS]
    rows, classes = [], []
    for e in entries:
        for r in e["results"]["rows"]:
            rows.append([e["kernel"], r["method"]] + [_fmt(r.get(k), f) for k, _, f in METRIC_COLS])
            classes.append("chance" if r["method"] == "random" else "")
    return ("table", head, rows, classes)


def _sanity_details(entries):
    blocks = []
    for e in entries:
        s = e["results"]["sanity"]
        if "stages" not in s:
            blocks.append(("p", f"Kernel {e['kernel']}: sanity test skipped: {s.get('skipped', 'not run')}."))
            continue
        head = ["method"] + [f"random to {st}" for st in s["stages"]]
        rows = [[m] + [f"{v:+.2f}" for v in r["rho"]] for m, r in s["methods"].items() if "rho" in r]
        blocks.append(("details", f"Kernel {e['kernel']}: Spearman ρ after each randomisation step "
                       f"({s['images']} images)", [("table", head, rows, None)]))
    return blocks


def _timing_table(entries):
    keys = list(entries[0]["results"]["timing_s"])
    head = ["kernel", "images"] + [f"{k} (s)" for k in keys] + ["total (s)"]
    rows = [[e["kernel"], e["results"]["images"]] + [f"{e['results']['timing_s'][k]:.1f}" for k in keys]
            + [f"{e['results']['total_s']:.1f}"] for e in entries]
    return ("table", head, rows, None)


def _habitat_blocks(entries):
    rows = []
    for e in entries:
        h = e["results"].get("habitat")
        if not h:
            continue
        for m, v in h["methods"].items():
            rows.append([e["kernel"], m] + [_fmt(v[k]) for k in ("object_energy", "background_energy",
                                                                  "object_energy_tied", "object_energy_untied")]
                        + [_fmt(h[k], "{:.1%}") for k in ("accuracy_tied", "accuracy_untied")])
    if not rows:
        return []
    h0 = next(e["results"]["habitat"] for e in entries if e["results"].get("habitat"))
    head = ["kernel", "method", "energy on object", "energy on background", "object, cue present",
            "object, cue absent", "accuracy, cue present", "accuracy, cue absent"]
    return [("h2", "Object or habitat?"),
            ("p", f"The dataset was generated with --habitat-bias {h0['bias']:g}: that share of images has the "
                  "background style tied to the class, a spurious cue like an animal's habitat. "
                  f"{h0['tied_images']} evaluated images carry the cue, {h0['untied_images']} do not. A network "
                  "that reads the habitat puts its heatmap energy on the background and loses accuracy when the "
                  "cue is absent."),
            ("table", head, rows, None)]


def _placement_findings(entries) -> list:
    lines = []
    for e in entries:
        r = _headline(e)
        if not all(math.isfinite(_num(r.get(f"{w}_{p}"))) for w in ("energy", "pointing") for p in PLACES):
            continue
        lines.append(f"Kernel {e['kernel']}: drawing each cell at its receptive field's centre "
                     f"({_shift(e):+.1f} px from the naive stretch, both axes) moves {r['method']}'s energy on the "
                     f"object from {r['energy_naive']:.2f} to {r['energy_geometric']:.2f} and its pointing game "
                     f"from {r['pointing_naive']:.2f} to {r['pointing_geometric']:.2f}.")
    return lines


def _findings(entries, chance, extra=()):
    lines = _placement_findings(entries)
    best = max(entries, key=lambda e: e["summary"]["final_val_accuracy"])
    lines.append(f"Best final validation accuracy: kernel {best['kernel']} "
                 f"({best['summary']['final_val_accuracy']:.2%}).")
    for e in entries:
        rows = [r for r in e["results"]["rows"] if r["method"] != "random" and
                math.isfinite(_num(r.get("energy_pointing_game")))]
        if not rows or not math.isfinite(chance):
            continue
        top = max(rows, key=lambda r: r["energy_pointing_game"])
        energy = top["energy_pointing_game"]
        ratio = energy / chance if chance > 0 else float("nan")
        verdict = ("concentrates on the object" if ratio >= 2 else "leans towards the object" if ratio >= 1.2
                   else "is no more on the object than a uniform map: the surroundings weigh as much")
        ceiling = _num(e["results"]["chance"].get("energy_ceiling"))
        lines.append(f"Kernel {e['kernel']}: the heatmap {verdict}. {top['method']} (highest energy share) puts "
                     f"{energy:.0%} of its energy on the object, which covers {chance:.0%} of the image: "
                     f"{ratio:.1f}x chance; {1 - energy:.0%} falls on the surroundings "
                     f"(pointing game {_fmt(top.get('pointing_game'))}, chance {chance:.2f})."
                     + (f" The mask itself, blurred to the CAM's resolution, would score {ceiling:.0%}."
                        if math.isfinite(ceiling) else ""))
        flagged = [r["method"] for r in e["results"]["rows"] if r.get("sanity_flag") == "FLAGGED"]
        if flagged:
            lines.append(f"Kernel {e['kernel']}: the maps of {', '.join(flagged)} stay similar when the weights are "
                         "randomised (sanity test flagged): they show the input more than what the model learned.")
        ins = e["results"].get("baselines", {}).get("insertion", {})
        if _num(ins.get("keeps_class")) >= 0.5:
            lines.append(f"Kernel {e['kernel']}: the {ins['kind']} images that insertion starts from are still "
                         f"classified as the explained class {ins['keeps_class']:.0%} of the time, so insertion AUC "
                         "hardly separates the methods here; deletion does.")
    return [("ul", lines + list(extra))]  # extra: the study's answers over every run (evaluate/study.py)


def build_blocks(entries, context):
    size = context["image_size"]
    chance = _num(entries[0]["results"]["chance"]["object_share"]) if entries else float("nan")
    blocks = [("h1", context.get("title", "explicam: kernel size and explanations")),
              ("p", f"Data: <code>{html.escape(context['data'])}</code>, {size}x{size} px, kernels "
                    f"{', '.join(str(e['kernel']) for e in entries)}. Generated {time.strftime('%Y-%m-%d %H:%M')} "
                    f"by <code>{html.escape(context.get('command', 'python cli.py sweep'))}</code>."),
              ("h2", "Findings")] + _findings(entries, chance, context.get("findings", ()))
    blocks += list(context.get("study_blocks", ()))  # repeats, size grid, habitat reliance
    blocks += [("h2", "Training (the seed's table)"), _seed_table(entries, size),
               ("p", "Receptive field: the side of the input square one conv4 unit can see, 31K - 15 px for this "
                     "network (theoretical; the effective field is smaller, Luo et al. 2016). Above 1.0 every unit "
                     "sees the whole image and more (zero padding), so object and surroundings mix in every unit."),
               ("img", "figures/val_accuracy.svg", "validation accuracy per epoch, every kernel")]
    blocks += [("img", f"figures/curves_k{e['kernel']}.png", f"training curves, kernel {e['kernel']}")
               for e in entries if e.get("curves")]
    blocks += [("h2", "Explanation metrics"),
               ("p", "Per kernel and method on the validation split; the italic random row is a random heatmap "
                     "of the same resolution, i.e. chance. Avg Drop / Increase in Confidence: Chattopadhay et al. "
                     "2018; deletion / insertion AUC: Petsiuk et al. 2018; pointing game: Zhang et al. 2016; "
                     f"energy-based pointing game: Wang et al. 2020 (a uniform map scores {_fmt(chance)}, the "
                     "ground-truth mask brought to the CAM's resolution sets the ceiling); "
                     "sanity ρ: Spearman correlation between trained and fully randomised maps, Adebayo et al. "
                     "2018 (flagged at ρ ≥ 0.5)."),
               _metric_table(entries)]
    if math.isfinite(chance):
        blocks.append(("img", "figures/energy.svg", "share of heatmap energy on the object"))
    blocks += _sanity_details(entries)
    blocks += _habitat_blocks(entries)
    blocks.append(("h2", "Heatmaps"))
    blocks += [("img", f"figures/heatmaps_k{e['kernel']}.png", f"kernel {e['kernel']}: every method") for e in entries]
    if len(entries) > 1:
        blocks.append(("img", "figures/by_kernel.png", f"{entries[0]['results']['methods'][0]} for every kernel"))
    placed = [e for e in entries if _placeable(e)]
    if placed:
        used = entries[0]["results"].get("placement", "naive")
        shifts = ", ".join(f"k{e['kernel']} {_shift(e):+.1f} px" for e in placed)
        blocks += [("h2", "Where the heatmap is drawn"),
                   ("p", f"The metrics above use the {html.escape(str(used))} placement. Geometric: each cell of the "
                         "conv4 map drawn at the centre of its receptive field, computed at export from the graph "
                         "(kernel, stride, pads and dilation of every layer). Naive: the map stretched over the "
                         "image, as most CAM code does. Geometric minus naive, along both axes: "
                         f"{shifts} (TensorFlow's <code>same</code> padding with an even kernel pads one more row "
                         "after than before, so every convolution looks half a cell further on). Pointing and "
                         "energy are given under both; Score-CAM's masks themselves stay naive, as in the "
                         "authors' code."),
                   *_effective_table(entries),
                   ("img", "figures/placement.png", f"{entries[0]['results']['methods'][0]}, one image per kernel: "
                    "naive (middle) beside geometric (right), the object outlined")]
    blocks += [("h2", "Time per metric"), _timing_table(entries),
               ("p", "Seconds of CPU wall time; forward passes are batched through onnxruntime.")]
    return blocks


# ---------------------------------------------------------------- renderers
def render_html(blocks) -> str:
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           "<title>explicam report</title>", f"<style>{CSS}</style></head><body>"]
    for b in blocks:
        out.append(_html_block(b))
    out.append("</body></html>")
    return "\n".join(out)


def _html_block(b) -> str:
    kind = b[0]
    if kind in ("h1", "h2"):
        return f"<{kind}>{html.escape(b[1])}</{kind}>"
    if kind == "p":
        return f'<p class="note">{b[1]}</p>'
    if kind == "ul":
        return "<ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in b[1]) + "</ul>"
    if kind == "img":
        return f'<figure><img src="{html.escape(b[1])}" alt="{html.escape(b[2])}"><figcaption class="note">' \
               f"{html.escape(b[2])}</figcaption></figure>"
    if kind == "details":
        return f"<details><summary>{html.escape(b[1])}</summary>" + "".join(_html_block(x) for x in b[2]) + \
               "</details>"
    _, head, rows, classes = b
    cls = classes or [""] * len(rows)
    body = "".join(f'<tr class="{c}">' + "".join(f"<td>{html.escape(str(v))}</td>" for v in r) + "</tr>"
                   for r, c in zip(rows, cls))
    return "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + f"</tr>{body}</table>"


def render_markdown(blocks) -> str:
    out = []
    for b in blocks:
        kind = b[0]
        if kind == "h1":
            out.append(f"# {b[1]}\n")
        elif kind == "h2":
            out.append(f"## {b[1]}\n")
        elif kind == "p":
            out.append(html.unescape(b[1].replace("<code>", "`").replace("</code>", "`")) + "\n")
        elif kind == "ul":
            out.append("\n".join(f"- {x}" for x in b[1]) + "\n")
        elif kind == "img":
            out.append(f"![{b[2]}]({b[1]})\n")
        elif kind == "details":
            out.append(f"**{b[1]}**\n\n" + render_markdown(b[2]))
        else:
            _, head, rows, _ = b
            out.append("| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n" +
                       "\n".join("| " + " | ".join(str(v) for v in r) + " |" for r in rows) + "\n")
    return "\n".join(out)


# ---------------------------------------------------------------- files
def _write_text(path, text):
    tmp = path + ".partial"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _placeable(e) -> bool:
    return bool(e["results"].get("geometry")) and f"cam_{e['results']['methods'][0]}" in e["examples"]


def write_figures(entries, fig_dir, chance) -> None:
    os.makedirs(fig_dir, exist_ok=True)
    series = {f"kernel {e['kernel']}": [(r["epoch"], r["val_accuracy"]) for r in e["history"]] for e in entries}
    _write_text(os.path.join(fig_dir, "val_accuracy.svg"),
                figures.svg_lines(series, "Validation accuracy", "epoch", "accuracy"))
    groups = {f"k{e['kernel']}": {r["method"]: _num(r.get("energy_pointing_game"))
                                  for r in e["results"]["rows"]} for e in entries}
    _write_text(os.path.join(fig_dir, "energy.svg"),
                figures.svg_bars(groups, "Heatmap energy on the object", "share", reference=chance))
    for e in entries:
        if e.get("curves"):
            shutil.copyfile(e["curves"], os.path.join(fig_dir, f"curves_k{e['kernel']}.png"))
        methods = e["results"]["methods"]
        save_png(os.path.join(fig_dir, f"heatmaps_k{e['kernel']}.png"),
                 figures.heatmap_grid(e["examples"], e["results"]["class_names"], methods))
    if len(entries) > 1:
        method = entries[0]["results"]["methods"][0]
        per_kernel = {e["kernel"]: e["examples"] for e in entries if f"heat_{method}" in e["examples"]}
        save_png(os.path.join(fig_dir, "by_kernel.png"),
                 figures.kernel_grid(per_kernel, method, entries[0]["results"]["class_names"]))
    placed = {e["kernel"]: (e["examples"], e["results"]["geometry"]) for e in entries if _placeable(e)}
    if placed:
        save_png(os.path.join(fig_dir, "placement.png"),
                 figures.placement_grid(placed, entries[0]["results"]["methods"][0]))


def write_report(out_dir: str, entries: list, context: dict) -> str:
    """Write index.html, report.md and figures/ into out_dir; returns the HTML path.
    entries: per kernel {kernel, summary, history, results, examples, curves}."""
    if not entries:
        raise ValueError("nothing to report: no run has finished training and evaluation yet")
    entries = sorted(entries, key=lambda e: e["kernel"])
    os.makedirs(out_dir, exist_ok=True)
    # several runs per kernel (seeds, sizes, datasets): the study's sections cover them all,
    # the per-kernel sections one representative run each
    context = study.extend_context(entries, context, os.path.join(out_dir, "figures"))
    entries = study.representatives(entries) if study.is_study(entries) else entries
    chance = _num(entries[0]["results"]["chance"]["object_share"])
    write_figures(entries, os.path.join(out_dir, "figures"), chance)
    blocks = build_blocks(entries, context)
    _write_text(os.path.join(out_dir, "report.md"), render_markdown(blocks))
    path = os.path.join(out_dir, "index.html")
    _write_text(path, render_html(blocks))
    return path


def load_examples(path: str) -> dict:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
