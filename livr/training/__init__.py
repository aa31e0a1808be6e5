"""The training loop and what it owns: `train.train_worker` (the one loop: setup / train_step / evaluate / save),
the engines (torch DDP or DeepSpeed ZeRO), checkpoints and atomic saving, the run's lifecycle and lock, the
non-finite policy, evaluation and scoring, throughput telemetry, and finding a finished run (`runs`).

Layer: above `livr.model` and `livr.tracking`; may import everything below them. Never imports Ray (the loop runs
the same single-process and under Ray Train), the insight tools or the CLI."""
