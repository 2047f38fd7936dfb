"""Benchmarks: the gateway against talking to the mocks directly, in one run (`python -m bench`).

The machine is shared and noisy, so every gateway figure is measured next to the same figure
without the gateway, with the same load generator and the same mocks, and reported as a ratio or
a difference. See docs/BENCHMARKS.md.
"""
