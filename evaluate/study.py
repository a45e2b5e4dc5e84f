"""The study over many runs: repeats (mean, spread, bootstrap intervals between kernels)
and the kernel x image-size grid (does conv4's receptive field over the image side, the
seed's proposed metric, predict accuracy and localisation better than the kernel alone?).
Habitat reliance lives in evaluate/reliance.py.

report.py keeps its per-kernel sections on one representative run per kernel (the
largest size, the first seed, the first dataset), and adds what this module writes:
blocks after the findings, sentences for the findings, SVG figures. Every sentence
names the run folder(s) its number comes from.
"""
from __future__ import annotations

import html
import math
import os
from itertools import combinations

from explicam.evaluate import reliance, stats
from explicam.evaluate.scatter import svg_scatter


# ---------------------------------------------------------------- runs
def size_of(e) -> int:
    return int(e.get("size") or e["results"]["input_size"])


def data_name(e) -> str:
    return os.path.basename(os.path.normpath(str(e.get("data") or e["results"].get("data") or "data")))


def run_name(e) -> str:
    return str(e.get("run_dir") or f"k{e['kernel']}")


def headline(e) -> dict:
    method = e["results"]["methods"][0]
    return next(r for r in e["results"]["rows"] if r["method"] == method)


def _num(v) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else float("nan")


def accuracy(e) -> float:
    return _num(e["summary"].get("final_val_accuracy"))


def energy(e) -> float:
    return _num(headline(e).get("energy_pointing_game"))


def rf_ratio(e) -> float:
    from explicam.evaluate.report import receptive_field

    return receptive_field(e["kernel"]) / size_of(e)


def groups(entries) -> dict:
    """(dataset, size, kernel) -> its runs, sorted by seed."""
    out: dict = {}
    for e in entries:
        out.setdefault((data_name(e), size_of(e), e["kernel"]), []).append(e)
    return {k: sorted(v, key=lambda e: (e.get("seed") is None, e.get("seed") or 0)) for k, v in sorted(out.items())}


def representatives(entries) -> list:
    """One run per kernel for the per-kernel sections: the largest size, first dataset, first seed."""
    first_data = data_name(entries[0]) if entries else None
    best: dict = {}
    for (data, size, kernel), runs in groups(entries).items():
        key = (data == first_data, size)
        if kernel not in best or key > best[kernel][0]:
            best[kernel] = (key, runs[0])
    return [best[k][1] for k in sorted(best)]


def is_study(entries) -> bool:
    return len(entries) > len({e["kernel"] for e in entries})


def _pm(mean, std, fmt="{:.1%}") -> str:
    if not math.isfinite(mean):
        return "-"
    return fmt.format(mean) + (f" ± {fmt.format(std)}" if math.isfinite(std) else "")


def _runs_text(runs) -> str:
    return ", ".join(run_name(e) for e in runs)


# ---------------------------------------------------------------- repeats
def repeats_table(entries):
    from explicam.evaluate.report import receptive_field

    method = entries[0]["results"]["methods"][0]
    several = len({data_name(e) for e in entries}) > 1
    head = (["dataset"] if several else []) + [
        "image size", "kernel", "runs (seeds)", "epochs run, mean", "wall time, mean", "final val. accuracy",
        "best val. accuracy", "receptive field of conv4", "RF / image side", f"{method} energy on object",
        f"{method} pointing"]
    rows = []
    for (data, size, kernel), runs in groups(entries).items():
        seeds = ", ".join(str(e.get("seed")) for e in runs)
        m = {k: stats.mean_std([_num(e["summary"].get(k)) for e in runs])
             for k in ("epochs_run", "wall_time_s", "final_val_accuracy", "best_val_accuracy")}
        en = stats.mean_std([energy(e) for e in runs])
        po = stats.mean_std([_num(headline(e).get("pointing_game")) for e in runs])
        rf = receptive_field(kernel)
        rows.append(([data] if several else []) + [
            f"{size} px", f"{kernel}x{kernel}", f"{len(runs)} ({seeds})", f"{m['epochs_run'][0]:.1f}",
            f"{m['wall_time_s'][0]:.0f}s", _pm(*m["final_val_accuracy"][:2]), _pm(*m["best_val_accuracy"][:2]),
            f"{rf} px", f"{rf / size:.2f}", _pm(*en[:2], "{:.3f}"), _pm(*po[:2], "{:.3f}")])
    return ("table", head, rows, None)


def kernel_differences(entries) -> list:
    """Every pair of kernels at the same dataset and size: the bootstrap interval of the
    difference of their mean accuracy and energy on the object."""
    by_cell: dict = {}
    for (data, size, kernel), runs in groups(entries).items():
        by_cell.setdefault((data, size), {})[kernel] = runs
    out = []
    for (data, size), kernels in by_cell.items():
        for ka, kb in combinations(sorted(kernels), 2):
            a, b = kernels[ka], kernels[kb]
            if len(a) < 2 or len(b) < 2:
                continue
            out.append({"data": data, "size": size, "a": ka, "b": kb, "runs_a": a, "runs_b": b,
                        "accuracy": stats.bootstrap_diff([accuracy(e) for e in a], [accuracy(e) for e in b]),
                        "energy": stats.bootstrap_diff([energy(e) for e in a], [energy(e) for e in b])})
    return out


def _points(d) -> dict:
    return {**d, **{k: 100 * d[k] for k in ("diff", "low", "high")}}


def _ci(d, fmt) -> str:
    if not math.isfinite(d["low"]):
        return "-"
    return f"{fmt.format(d['diff'])} [{fmt.format(d['low'])}, {fmt.format(d['high'])}]"


def differences_blocks(diffs) -> list:
    if not diffs:
        return []
    several = len({d["data"] for d in diffs}) > 1
    rows = [([d["data"]] if several else []) + [
        f"{d['size']} px", f"{d['a']} vs {d['b']}", _ci(_points(d["accuracy"]), "{:+.1f}"),
        "yes" if d["accuracy"]["excludes_zero"] else "no", _ci(d["energy"], "{:+.3f}"),
        "yes" if d["energy"]["excludes_zero"] else "no"] for d in diffs]
    n = min(min(d["accuracy"]["n"]) for d in diffs)
    head = (["dataset"] if several else []) + [
        "image size", "kernels", "Δ final val. accuracy, points [95% interval]", "beyond seed spread?",
        "Δ energy on object [95% interval]", "beyond seed spread?"]
    return [("p", f"Differences between kernels, first minus second, with a percentile bootstrap interval "
                  f"({stats.BOOTSTRAP_RESAMPLES} resamples of each kernel's seeds). An interval that excludes 0 "
                  "means the kernels differ by more than their seed-to-seed spread explains."
                  + (f" With {n} seeds per kernel the interval is rough: it can only be as wide as the seeds "
                     "themselves are apart." if n < 5 else "")),
            ("table", head, rows, None)]


def repeats_findings(entries, diffs) -> list:
    lines = []
    for (data, size), cell in _cells(entries).items():
        if max(len(r) for r in cell.values()) < 2:
            continue
        means = {k: stats.mean_std([accuracy(e) for e in runs]) for k, runs in cell.items()}
        k = max(means, key=lambda kk: means[kk][0])
        lines.append(f"Repeats ({data}, {size} px): over {means[k][2]} seeds kernel {k} reaches the best mean final "
                     f"validation accuracy, {_pm(*means[k][:2])} (mean ± std; runs {_runs_text(cell[k])}).")
    for d in diffs:
        acc = d["accuracy"]
        verdict = ("more than the seed-to-seed spread explains" if acc["excludes_zero"]
                   else "within the seed-to-seed spread: these runs cannot tell the two kernels apart")
        lines.append(f"Kernel {d['a']} vs kernel {d['b']} ({d['data']}, {d['size']} px): {100 * acc['diff']:+.1f} "
                     f"points of validation accuracy, 95% bootstrap interval [{100 * acc['low']:+.1f}, "
                     f"{100 * acc['high']:+.1f}], {verdict} (runs {_runs_text(d['runs_a'])} vs "
                     f"{_runs_text(d['runs_b'])}).")
    return lines


def _cells(entries) -> dict:
    out: dict = {}
    for (data, size, kernel), runs in groups(entries).items():
        out.setdefault((data, size), {})[kernel] = runs
    return out


# ---------------------------------------------------------------- receptive field / image side
def ratio_correlations(entries) -> dict:
    r = [rf_ratio(e) for e in entries]
    k = [e["kernel"] for e in entries]
    acc, en = [accuracy(e) for e in entries], [energy(e) for e in entries]
    return {"runs": len(entries), "ratio_accuracy": stats.spearman(r, acc), "kernel_accuracy": stats.spearman(k, acc),
            "ratio_energy": stats.spearman(r, en), "kernel_energy": stats.spearman(k, en),
            "sizes": sorted({size_of(e) for e in entries})}


def _rho(v) -> str:
    return f"{v:+.2f}" if math.isfinite(v) else "-"


def ratio_blocks(entries, c) -> list:
    method = entries[0]["results"]["methods"][0]
    rows = [["validation accuracy (final)", _rho(c["ratio_accuracy"]), _rho(c["kernel_accuracy"])],
            [f"{method} energy on the object", _rho(c["ratio_energy"]), _rho(c["kernel_energy"])]]
    return [("h2", "Kernel size against image size"),
            ("p", f"The seed asks for a metric that relates the kernel to the image. Here it is the receptive field "
                  f"of conv4 (31K - 15 px) divided by the image side, over all {c['runs']} runs "
                  f"({', '.join(str(s) for s in c['sizes'])} px). Spearman's rank correlation says how well each "
                  "number orders the runs; the kernel alone ignores the image size."),
            ("table", ["Spearman ρ with", "RF / image side", "kernel size alone"], rows, None),
            ("img", "figures/rf_ratio_accuracy.svg", "final validation accuracy of every run against RF / image side"),
            ("img", "figures/rf_ratio_energy.svg", f"{method} energy on the object of every run against RF / image "
                                                    "side")]


def ratio_findings(entries, c) -> list:
    if len(c["sizes"]) < 2 or not math.isfinite(c["ratio_accuracy"]):
        return []
    better = abs(c["ratio_accuracy"]) - abs(_nz(c["kernel_accuracy"]))
    verdict = ("predicts it better than the kernel size alone" if better > 0.05 else
               "predicts it no better than the kernel size alone" if better > -0.05 else
               "predicts it worse than the kernel size alone")
    best = max(entries, key=accuracy)
    text = (f"Kernel against image size: over {c['runs']} runs at {', '.join(str(s) for s in c['sizes'])} px, "
            f"conv4's receptive field divided by the image side ranks validation accuracy with Spearman ρ = "
            f"{c['ratio_accuracy']:+.2f} (kernel size alone: {_rho(c['kernel_accuracy'])}): the ratio {verdict}. "
            f"Best run: {run_name(best)}, {accuracy(best):.1%} at a ratio of {rf_ratio(best):.2f}.")
    if math.isfinite(c["ratio_energy"]):
        text += (f" For the energy on the object ρ = {c['ratio_energy']:+.2f} (kernel alone "
                 f"{_rho(c['kernel_energy'])}).")
    return [text]


def _nz(v) -> float:
    return v if math.isfinite(v) else 0.0


def _by_kernel(entries, value) -> dict:
    pts: dict = {}
    for e in sorted(entries, key=lambda e: e["kernel"]):
        pts.setdefault(f"kernel {e['kernel']}", []).append((rf_ratio(e), value(e)))
    return pts


# ---------------------------------------------------------------- what report.py calls
def extend_context(entries, context: dict, fig_dir: str) -> dict:
    """The study's blocks, findings and figures for `entries` (every run); context for
    report.build_blocks. Nothing is added for one run per kernel, one size, no counterfactuals."""
    extra = {"findings": [], "study_blocks": []}
    if is_study(entries):
        reps = representatives(entries)
        diffs = kernel_differences(entries)
        extra["image_size"] = size_of(reps[0])
        title = ("Repeats: mean and spread over seeds" if max(len(r) for r in groups(entries).values()) > 1
                 else "Every run, by kernel")
        extra["study_blocks"] += [
            ("h2", title),
            ("p", f"{len(entries)} runs. Each cell: mean ± sample standard deviation over the runs of one kernel "
                  "(the seed's columns). The per-kernel sections further down show one run per kernel: "
                  + html.escape(", ".join(run_name(e) for e in reps)) + "."),
            repeats_table(entries)] + differences_blocks(diffs)
        extra["findings"] += repeats_findings(entries, diffs)
        c = ratio_correlations(entries)
        if len(c["sizes"]) > 1:
            extra["study_blocks"] += ratio_blocks(entries, c)
            extra["findings"] += ratio_findings(entries, c)
            os.makedirs(fig_dir, exist_ok=True)
            for name, value, label, y_range in (("accuracy", accuracy, "final validation accuracy", (0.0, 1.0)),
                                                ("energy", energy, "energy on the object", None)):
                _write(os.path.join(fig_dir, f"rf_ratio_{name}.svg"),
                       svg_scatter(_by_kernel(entries, value), f"{label} vs RF / image side",
                                   "receptive field of conv4 / image side (log scale)", label,
                                   y_range=y_range, log_x=True))
    blocks, findings = reliance.blocks_and_findings(entries, fig_dir)
    extra["study_blocks"] += blocks
    extra["findings"] += findings
    return {**context, **extra}


def _write(path, text):
    tmp = path + ".partial"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
