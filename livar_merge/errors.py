"""Every exception livar raises on bad input, in one module under one base class.

``LivarError`` derives from ``ValueError``, so ``except ValueError`` still catches it; the CLIs
catch ``LivarError`` and ``OSError`` only, so anything else (a bug) keeps its traceback.
"""

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


class InvalidReplyError(ClientUpdateError):
    """A client reply that cannot be aggregated; the message names the node, client and key."""


class RoundFailedError(LivarError):
    """Too few valid replies (or connected nodes) to aggregate a round."""


class RunConfigError(LivarError):
    """A Flower run config holds a key or value that is not a livar option or setting."""


class NodeConfigError(LivarError):
    """A message or node config a ClientApp cannot serve (protocol, partition, backbone)."""


class PartitionError(LivarError):
    """A partition was asked for with impossible parameters or could not be drawn."""


class GlobalStateError(LivarError):
    """A model cannot carry LIVAR's global state (not a peft LoRA model, no trainable head, DoRA,
    several adapters), or a global-state tensor names no parameter or has another shape."""


class RunFolderError(LivarError):
    """A results folder holds another run, or its checkpoint cannot be resumed."""


class ArtifactError(LivarError):
    """An artifact needed for a figure or table is missing or inconsistent."""


class RunReadError(ArtifactError):
    """A run folder's file cannot be read back (missing, malformed JSON or CSV, a missing
    field or column, a layout version this livar does not read)."""


class CalibrationError(LivarError):
    """Calibration inputs (repeat files, rows, SHAP results) are missing or inconsistent."""


class MissingHeadsError(CalibrationError):
    """A calibration's proxy training saved no heads (it predates the downstream check)."""


class ExportError(LivarError):
    """A run folder cannot be exported (no finished checkpoint or config, another livar's run)
    or the export's output already exists."""


class EngineUnavailableError(LivarError):
    """An execution engine was asked for whose package is not installed (``--engine ray``
    without ray)."""
