"""The report: scores, figures, provenance, rendering, and experiment comparison."""
