"""Importance metrics, the greedy search and its runs, Ray workers, the frontier, recovery."""
