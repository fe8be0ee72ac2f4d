"""Stored data of earlier livar versions, upgraded in one place.

Run folders, checkpoints, config files and Flower run configs written by an earlier version are
read through these functions; no other module knows an old format. Each entry says what changed:

=======================  =====================================================================
what                     earlier form -> current form
=======================  =====================================================================
run options              options version 1 (no ``options_version`` in config.json): ``augment``
                         was a boolean (true: ``pad-crop``) before ``rrc`` existed; version 2
                         is today's. :func:`upgrade_options` applies the steps from a folder's
                         version (every step for files and run configs, whose version is
                         unknown: each step leaves today's form unchanged)
option hashes            options added after run folders existed are left out of a hash at
                         their default, and ``augment`` hashes as the boolean it once was, so
                         earlier runs keep their hash and resume: :func:`legacy_hash_body`
                         (``livar-fed``), :func:`legacy_training_hash_body` and
                         :func:`legacy_calibration_hash_body` (calibrations)
client memory            the omega tracker's state was stored raw (``tracker_state``) before
                         the codec of ``ClientMemory``: :func:`upgrade_memory_record`
=======================  =====================================================================

Run-folder layouts are versioned by :data:`~livar_merge.federated.run_layout.LAYOUT_VERSION`
(a folder without one is version 1, the only one so far).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from livar_merge.errors import ConfigError

# augment's boolean form -> its choice
LEGACY_AUGMENT = {True: "pad-crop", False: "off"}
# livar-fed options added after results folders existed: left out of the hash at this value
HASH_OMITS_DEFAULT: dict[str, Any] = {
    "clients_per_round": None,
    "fraction_train": None,
    "ccvr_rounds": "all",
    "paired": [],
    "protocol": "paper",
    "sigma_inputs": "normalised",
    "client_ranks": [],
}
# options of both commands added after run folders and calibrations existed (same rule)
DATA_HASH_OMITS_DEFAULT: dict[str, Any] = {
    "test_fraction": 0.2,
    "image_column": "image",
    "label_column": "label",
    "partitioner": "dirichlet",
    "shards_per_client": 2,
    "classes_per_client": 2,
}
HASH_OMITS_DEFAULT.update(DATA_HASH_OMITS_DEFAULT)
# livar-calibrate training options added after calibrations existed (same rule)
TRAINING_HASH_OMITS_DEFAULT: dict[str, Any] = {"augment": "off", **DATA_HASH_OMITS_DEFAULT}


def upgrade_augment(value: Any) -> Any:
    """``augment`` given as the boolean it once was (``true``/``false``/``1``/``0``/``yes``/
    ``no``) as its choice; any other value unchanged."""
    if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
        value = value.lower() in ("true", "yes", "1")
    if isinstance(value, bool | int) and value in (0, 1):
        return LEGACY_AUGMENT[bool(value)]
    return value


def _augment_choice(options: dict[str, Any]) -> dict[str, Any]:
    """Version 1 -> 2: the boolean ``augment`` as its choice."""
    if "augment" in options:
        options["augment"] = upgrade_augment(options["augment"])
    return options


#: the options version this livar writes (config.json ``options_version``)
OPTIONS_VERSION = 2
# step v: options of version v -> version v + 1
OPTION_STEPS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {1: _augment_choice}


def upgrade_options(options: Mapping[str, Any], version: int | None = None) -> dict[str, Any]:
    """Run options written at options ``version`` in today's form (a copy). ``None``: unknown
    (a TOML/JSON file, a Flower run config): every step runs, each leaving today's form as it
    is. A version newer than :data:`OPTIONS_VERSION` is refused."""
    start = 1 if version is None else version
    if not isinstance(start, int) or not 1 <= start <= OPTIONS_VERSION:
        raise ConfigError(
            f"options_version {version!r}: this livar reads options of versions 1 to "
            f"{OPTIONS_VERSION} (a newer livar wrote them)"
        )
    upgraded = dict(options)
    for step in range(start, OPTIONS_VERSION):
        upgraded = OPTION_STEPS[step](upgraded)
    return upgraded


def _omit_later_defaults(body: dict[str, Any], omitted: Mapping[str, Any]) -> dict[str, Any]:
    for name, default in omitted.items():
        if body.get(name, default) == default:
            body.pop(name, None)
    return body


def legacy_hash_body(body: Mapping[str, Any]) -> dict[str, Any]:
    """The options a ``livar-fed`` config hash covers, in the form earlier versions hashed."""
    hashed = dict(body)
    if "augment" in hashed:
        legacy = {choice: flag for flag, choice in LEGACY_AUGMENT.items()}
        hashed["augment"] = legacy.get(hashed["augment"], hashed["augment"])
    return _omit_later_defaults(hashed, HASH_OMITS_DEFAULT)


def legacy_calibration_hash_body(body: Mapping[str, Any]) -> dict[str, Any]:
    """The options a calibration's config hash covers, as earlier versions hashed them."""
    return _omit_later_defaults(dict(body), DATA_HASH_OMITS_DEFAULT)


def legacy_training_hash_body(body: Mapping[str, Any]) -> dict[str, Any]:
    """The options a calibration's training hash covers, as earlier versions hashed them."""
    return _omit_later_defaults(dict(body), TRAINING_HASH_OMITS_DEFAULT)


def upgrade_memory_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """A client's memory record (``omega``, ``steps``, ``layer-names``) from any version."""
    if "tracker_state" in record:  # state.json of checkpoints written before the codec
        legacy = record["tracker_state"]
        return {**legacy, "layer-names": legacy["layer_names"]}
    return dict(record)
