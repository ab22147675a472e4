"""ptune: a reproducible P-tuning v2 pipeline for GLM-family chat models."""
