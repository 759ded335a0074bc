"""Throughput and memory benchmarks: ``python -m benchmarks.<name>``. They print figures; they are not tests."""
