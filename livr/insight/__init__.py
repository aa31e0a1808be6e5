"""What a trained run learned: `verify` (the method's properties checked on a real backbone), `inspect` (masks,
groups and attention of one example), the causal analysis of the latents and its report, and Table-1 reports.

Layer: above `livr.training`; may import everything below it. Beside `livr.cluster` and `livr.tools`."""
