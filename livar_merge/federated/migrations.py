"""Stored data of earlier livar versions, upgraded in one place.

Run folders, checkpoints, config files and Flower run configs written by an earlier version are
read through these functions; no other module knows an old format. Each entry says what changed:

=======================  =====================================================================
what                     earlier form -> current form
=======================  =====================================================================
run options              ``augment`` was a boolean (true: ``pad-crop``) before ``rrc`` existed:
                         :func:`upgrade_options` (config.json, TOML/JSON files, run configs)
option hashes            options added after run folders existed are left out of a hash at
                         their default, and ``augment`` hashes as the boolean it once was, so
                         earlier runs keep their hash and resume: :func:`legacy_hash_body`
                         (``livar-fed``), :func:`legacy_training_hash_body` (calibrations)
client memory            the omega tracker's state was stored raw (``tracker_state``) before
                         the codec of ``ClientMemory``: :func:`upgrade_memory_record`
=======================  =====================================================================

Run-folder layouts are versioned by :data:`~livar_merge.federated.run_layout.LAYOUT_VERSION`
(a folder without one is version 1, the only one so far).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

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
# livar-calibrate training options added after calibrations existed (same rule)
TRAINING_HASH_OMITS_DEFAULT: dict[str, Any] = {"augment": "off"}


def upgrade_augment(value: Any) -> Any:
    """``augment`` given as the boolean it once was (``true``/``false``/``1``/``0``/``yes``/
    ``no``) as its choice; any other value unchanged."""
    if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
        value = value.lower() in ("true", "yes", "1")
    if isinstance(value, bool | int) and value in (0, 1):
        return LEGACY_AUGMENT[bool(value)]
    return value


def upgrade_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Run options of any livar version in today's form (a copy)."""
    upgraded = dict(options)
    if "augment" in upgraded:
        upgraded["augment"] = upgrade_augment(upgraded["augment"])
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


def legacy_training_hash_body(body: Mapping[str, Any]) -> dict[str, Any]:
    """The options a calibration's training hash covers, as earlier versions hashed them."""
    return _omit_later_defaults(dict(body), TRAINING_HASH_OMITS_DEFAULT)


def upgrade_memory_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """A client's memory record (``omega``, ``steps``, ``layer-names``) from any version."""
    if "tracker_state" in record:  # state.json of checkpoints written before the codec
        legacy = record["tracker_state"]
        return {**legacy, "layer-names": legacy["layer_names"]}
    return dict(record)
