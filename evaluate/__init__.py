"""Measuring explanations: faithfulness, localisation, sanity; the kernel-size sweep and its report.

    from explicam.evaluate import run_evaluation, EvalConfig, run_report
    run_evaluation("runs/k4/model.onnx", "data/synth", EvalConfig(methods=["gradcam"]))
    run_report("data/synth", ["runs/k4"], out="report", methods=["gradcam", "gradcam++"], limit=100)

Modules: metrics (the definitions, cited), inputs (validation split, masks, boxes),
evaluate (the `evaluate` command), sanity (Adebayo's randomisation test, the only part that
needs TensorFlow), sweep (the `sweep` command), report and figures (HTML + Markdown).
"""

_LAZY = {"run_evaluation": "evaluate.evaluate", "EvalConfig": "evaluate.evaluate",
         "run_report": "evaluate.sweep", "run_sweep": "evaluate.sweep"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)
