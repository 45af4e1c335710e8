"""Measuring a defense: detectors and metrics, the CLIP scorer, reports and charts."""
