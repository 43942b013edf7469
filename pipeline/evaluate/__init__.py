"""Scoring a trained detector: AUROC/AUPRO/Dice metrics, the trivial baselines, the ignite metrics and the
evaluation report."""
