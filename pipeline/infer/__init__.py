"""Whole-volume inference: bundle settings and decision threshold, heatmaps on the input grid, lesion candidates,
overlays, many cases."""
