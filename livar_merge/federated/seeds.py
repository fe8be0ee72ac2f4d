"""Seeds derived from the run seed (torch-free): one home for every per-round, per-client or
per-purpose seed of a run."""

from __future__ import annotations

import hashlib


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from the run seed and (round, client, purpose), stable across runs."""
    text = "/".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 1
