"""Experiments over variants and seeds (`python -m pipeline compare`), their result tables and figures."""
