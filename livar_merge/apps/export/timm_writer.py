"""``--to timm``: the merged, complete timm state dict and its sidecar (exact)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from livar_merge._io import save_tensors, write_json
from livar_merge.apps.export.check import CheckData, checked_record
from livar_merge.apps.export.source import (
    LoadedRun,
    Say,
    create_timm,
    model_record,
    sha256_label,
    sidecar_path,
    timm_state,
)


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
        **checked_record(run, fresh, data, exact=True),
    }
    write_json(sidecar_path(file), record)
    return record
