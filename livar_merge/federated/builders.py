"""Data and model set-up shared by ``livar-fed`` and ``livar-calibrate``.

Both configs name these options alike (dataset/proxy, data_root, image_size, max_train, model,
weights, patch_size, embed_dim, depth, num_heads, lora_rank, lora_alpha, lora_dropout), so the
builders read them by attribute.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from livar_merge.federated.data import derive_seed


def load_train_test(dataset: str, config: Any, seed: int) -> tuple[Any, Any, Any]:
    """``(splits, train, test)`` with the stratified subsamples ``max_train``/``max_test``."""
    from livar_merge.federated.datasets import load_dataset, stratified_subsample, subset

    splits = load_dataset(dataset, config.data_root, image_size=config.image_size, seed=seed)
    train, test = splits.train, splits.test
    max_train, max_test = getattr(config, "max_train", None), getattr(config, "max_test", None)
    if max_train is not None and max_train < len(train):
        train = subset(train, stratified_subsample(np.asarray(train.labels), max_train, seed))
    if max_test is not None and max_test < len(test):
        test = subset(test, stratified_subsample(np.asarray(test.labels), max_test, seed))
    return splits, train, test


def build_seeded_model(config: Any, num_classes: int, seed: int) -> tuple[torch.nn.Module, Any]:
    """The peft LoRA ViT of ``config``, initialised from ``seed`` (same seed, same weights)."""
    from livar_merge.federated.model import build_model

    torch.manual_seed(derive_seed(seed, "model-init"))
    overrides = {
        name: getattr(config, name) for name in ("patch_size", "embed_dim", "depth", "num_heads")
    }
    return build_model(
        config.model,
        num_classes,
        weights=config.weights,
        image_size=config.image_size,
        rank=config.lora_rank,
        alpha=config.lora_alpha,
        dropout=getattr(config, "lora_dropout", 0.0),
        overrides=overrides,
    )
