"""Benchmarks run by `ragdec bench`; results are committed under bench/results/."""
