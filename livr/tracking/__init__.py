"""MLflow tracking: rank 0 only, one stable run per livr run (`tracker`), and the outbox that keeps metrics through
a tracking-server outage (`outbox`).

Layer: beside `livr.model`; may import `livr.config` and `livr.utils` only."""
