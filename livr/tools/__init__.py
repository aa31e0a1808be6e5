"""Tools around runs: `plan` (memory and time before a run), `export` (a standalone Hugging Face checkpoint), the
CPU `demo` and the tiny backbone's `warmup`.

Layer: above `livr.training`; may import everything below it. Beside `livr.cluster` and `livr.insight`."""
