"""The method's primitives (LIVR_SPEC §1–3): latent tokens (`latents`), the token-group vocabulary of one sequence
(`groups`) and the attention rules over it, the Stage-1 visual bottleneck included (`mask`).

Layer: above `livr.config` and `livr.utils`; may import only those. Knows nothing of rows, files, backbones,
Ray, DeepSpeed or MLflow: the families (`livr.backbones`) and the data (`livr.data`) build on it."""
