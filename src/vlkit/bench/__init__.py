"""Benchmarks behind ``vlkit bench``: our figure and the peers' side by side, measured in one run."""
