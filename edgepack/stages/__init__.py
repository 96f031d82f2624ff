"""The packaging stages, one module each, in pipeline order (see edgepack/pipeline/plan.py)."""
