"""One loader per dataset source; importing this package registers them all.

The modules are imported in the original registration order (the order of ``DATASETS``).
"""

from livar_merge.federated.datasets.sources import (  # noqa: F401, I001 (imported to register)
    tiny_imagenet,
    cifar100,
    class_folders,
    cub200,
    digits,
    fashion_mnist,
    synthetic,
    imagefolder,
    huggingface,
)
