"""Latency benchmark suite and reports."""
