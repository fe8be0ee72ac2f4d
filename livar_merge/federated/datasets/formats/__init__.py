"""Readers of the on-disk formats the dataset sources are stored in.

``folders`` (data roots, class folders), ``text`` (line tables), ``idx`` (MNIST-style ubyte
files), ``cifar_pickle`` (CIFAR python batches, restricted unpickler), ``parquet`` (image/label
shards). Each raises :class:`~livar_merge.errors.DatasetError` naming the file at fault.
"""
