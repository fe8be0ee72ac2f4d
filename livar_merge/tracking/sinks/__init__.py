"""The trackers, one module each (importing this package registers them; each imports its
library only when a run uses it)."""

from livar_merge.tracking.sinks import mlflow_sink, tensorboard_sink  # noqa: F401
