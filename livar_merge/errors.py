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


class ConfigError(LivarError):
    """An option of a run (command line, config file, Flower run config) is unknown or invalid.

    The message names the option and, for a choice, the allowed values.
    """


class UnknownMethodError(ConfigError):
    """No aggregation method of the registry has this name."""


class MethodOptionError(ConfigError):
    """An aggregation method was given an option it does not declare, or a value it refuses."""


class PairedMethodError(ConfigError):
    """A ``paired`` method cannot be evaluated on the run's client updates."""


class RegistrationError(LivarError):
    """A method registration is inconsistent: name taken, undeclared options, unknown needs."""
