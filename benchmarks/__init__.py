"""Benchmarks of training throughput, inference speed-up and the input pipeline (see each module)."""
