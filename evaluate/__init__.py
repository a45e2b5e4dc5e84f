"""Measuring explanations: faithfulness, localisation, sanity; the kernel-size sweep and its report."""
