"""livr: Latent Implicit Visual Reasoning (arXiv 2512.21218) — latent tokens, a visual-bottleneck mask,
two-stage LoRA training; Ray Train / DeepSpeed / Ray Tune / MLflow around one training function."""

__version__ = "0.1.0"
