"""Faults on a cluster simulated with network namespaces (issue 16): see tests/chaos/netns.py."""
