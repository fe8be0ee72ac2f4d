"""Exceptions raised by livar. All derive from ``ValueError`` so callers can catch broadly."""

from __future__ import annotations


class LivarError(ValueError):
    """Base class of every error livar raises on bad input."""


class TableError(LivarError):
    """A G_SHAP table file is missing, malformed, tampered with or of an unsupported version."""


class ClientUpdateError(LivarError):
    """A client's contribution (omegas, LoRA factors, head, statistics) is unusable.

    The message names the client (and layer or key) at fault.
    """


class WeightsError(LivarError):
    """A named pretrained weight source is missing, tampered with or does not fit the model."""


class DatasetError(LivarError):
    """A dataset is unknown, missing, malformed or asked for with bad options."""
