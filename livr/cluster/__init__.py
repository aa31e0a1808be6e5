"""Orchestration: Ray Train around `livr.training.train.train_worker` (`ray_train`) and Ray Tune over it (`tune`,
its search space, trials, signed trial state and sweep report).

Layer: above `livr.training`; may import everything below it. Beside `livr.insight` and `livr.tools`, which it
never imports (nor they it)."""
