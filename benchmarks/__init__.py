"""Benchmarking: prompt sets, interleaved runs against HF baselines, reports."""
