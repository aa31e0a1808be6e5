"""Model assembly: a backbone family's model + the latent rows + PEFT LoRA + freezing (`build`), the attention
kernels per stage and device (`attention`, `device`), the flex_attention BlockMask path (`flex`), the frozen-vision
cache (`vision_cache`) and the FLOPs count (`flops`).

Layer: above `livr.backbones` and `livr.data`; may import them, `livr.method`, `livr.config` and `livr.utils`.
Never imports the training loop, tracking or orchestration."""
