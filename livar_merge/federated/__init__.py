"""The federated runtime: datasets, partitioning, LoRA ViT clients, rounds, ``livar-fed``."""
