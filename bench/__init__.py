"""Benchmarks and device checks (`make bench`, `make gpu-check`)."""
