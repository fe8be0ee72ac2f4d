"""``livar-export``: the final global model of a ``livar-fed`` run, in a form timm and peft load.

The run's model is rebuilt from ``RUN_DIR/config.json`` exactly as the run built it (same seed:
same random initialisation; same weights source otherwise), the final checkpoint
(``checkpoint/global.safetensors``) is loaded into it, and one of two formats is written:

``--to timm FILE``  the merged, complete timm state dict (LoRA folded in, the trained head) as
                    safetensors, which loads with ``strict=True`` into
                    ``timm.create_model(model, num_classes=C, **create_kwargs)``; a sidecar
                    ``FILE.json`` (FILE with ``.json``) names the model, ``num_classes``, the
                    create kwargs, the input normalisation and the provenance. Exact in every
                    merge mode.
``--to peft DIR``   a peft LoRA adapter folder (``adapter_config.json``,
                    ``adapter_model.safetensors`` by peft's ``save_pretrained``, the head as
                    ``modules_to_save``) relative to the pretrained base W0. ``svd``/``factors``
                    runs: the LoRA factors as trained (exact). ``product`` runs fold every
                    round's merge into the frozen weights, so the adapter is the cumulative
                    update (folded weights - W0 + the current LoRA) of every layer re-factorised
                    by truncated SVD to ``--rank`` (default: the run's ``lora_rank``): exact when
                    the update's rank allows, else the relative Frobenius error of every layer
                    is reported. The base is written too (``base_model.safetensors``) unless it
                    is timm's own pretrained checkpoint from the Hugging Face cache
                    (``--base auto``), as a random initialisation, a local file or a converted
                    named source cannot be recreated with timm alone.

Either format is then loaded back from the written files as a user would (fresh timm model,
``PeftModel.from_pretrained``) and compared with the rebuilt run model on the run's test images
(max abs logit difference, top-1, and the run's final ``test_accuracy`` of ``metrics.csv`` when
the whole test set is checked); the result goes into the JSON written beside the output.
"""

from livar_merge.apps.export.cli import ExportOptions, export_run, main

__all__ = ["ExportOptions", "export_run", "main"]
