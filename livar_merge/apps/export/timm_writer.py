"""``--to timm``: the merged, complete timm state dict and its sidecar (exact)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from livar_merge._io import save_tensors, write_json
from livar_merge.apps.export.check import CheckData, compare, logits_of
from livar_merge.apps.export.source import (
    LoadedRun,
    Say,
    create_timm,
    export_provenance,
    model_record,
    protocol_warning,
    run_record,
    sha256_label,
    sidecar_path,
    timm_state,
)

if TYPE_CHECKING:
    pass


# ------------------------------------------------------------------------------- timm
def export_timm(run: LoadedRun, file: Path, data: CheckData, say: Say = print) -> dict[str, Any]:
    """Write the merged timm state dict and its sidecar; returns the sidecar's record."""
    from safetensors.torch import load_file

    state = timm_state(run.model)
    metadata = {"model": run.config.model, "num_classes": str(run.num_classes)}
    save_tensors(file, state, {**metadata, "format": "pt"})
    say(f"wrote {file} ({len(state)} tensors); loading it back into a fresh timm model")
    fresh = create_timm(run)
    fresh.load_state_dict(load_file(str(file)), strict=True)
    reference = logits_of(run.model, data)
    check = compare(run, reference, fresh, data, exact=True)
    record = {
        "format": "timm",
        "exact": True,
        "exactness": "the final global model itself: LoRA merged, head included (every mode)",
        "file": file.name,
        "sha256": sha256_label(file),
        **model_record(run),
        "load": (
            "timm.create_model(model, pretrained=False, num_classes=num_classes, "
            "**create_kwargs).load_state_dict(safetensors.torch.load_file(file), strict=True)"
        ),
        "check": check,
        "warning": protocol_warning(run),
        "run": run_record(run),
        "provenance": export_provenance(),
    }
    write_json(sidecar_path(file), record)
    return record
