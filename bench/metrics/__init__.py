"""Metrics: task scores now; sharpness, latency and model size join here as metric plugins."""
