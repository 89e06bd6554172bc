"""Deployed inference and measurement: jitted predictors with weights compiled in, latency measurement, network profiles."""
