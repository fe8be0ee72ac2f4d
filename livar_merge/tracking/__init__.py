"""Experiment trackers that mirror run and calibration folders (``--track tensorboard mlflow``).

* :mod:`~livar_merge.tracking.base`: the :class:`Tracker` contract and its registry;
* :mod:`~livar_merge.tracking.sinks`: one module per tracker (TensorBoard, MLflow);
* :mod:`~livar_merge.tracking.records`: what is recorded, from the folder's rows (tag names);
* :mod:`~livar_merge.tracking.hub`: :class:`Trackers`, kept in step with a folder and resumed
  with it.

The trackers are the ``track`` extra: ``pip install 'livar[track]'``.
"""

from livar_merge.tracking.base import TRACKERS, Tracker, check_trackers, register_tracker
from livar_merge.tracking.hub import STATE_FILE, Trackers

__all__ = ["STATE_FILE", "TRACKERS", "Tracker", "Trackers", "check_trackers", "register_tracker"]
