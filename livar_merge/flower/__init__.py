"""LIVAR on Flower (``flwr`` 1.41 Message API): strategy, ServerApp/ClientApp, simulation.

Only this subpackage imports ``flwr`` (install the ``flower`` extra). Modules:

``messages``    wire format of the global model and of a client reply; ``validate_reply``
``strategy``    :class:`LivarStrategy` (transport only) over a :class:`FederatedServer`
                (the round, flwr-free, re-exported here) and :class:`FlowerSettings`
``server_app``  ``server_app``: the ServerApp component named in ``pyproject.toml``
``client_app``  ``client_app``: the ClientApp component named in ``pyproject.toml``
``simulation``  ``livar-fed --engine flower``: the App on the Simulation Engine

What travels each round (see ``messages`` for the keys):

* server -> client: the global model as one ArrayRecord (LoRA factors, head, and with
  ``lora_merge="product"`` the frozen weights of the LoRA layers, into which every round's merged
  update is folded) and a ConfigRecord with the round, the resolved ``livar-fed`` options
  (JSON), the statistics the method needs and a checksum of the frozen backbone;
* client -> server: LoRA factors and head (ArrayRecord), omega_A/omega_B per layer, per-class
  feature variance, presence and counts, sample count and training metrics (MetricRecord), and
  client id, partition id, layer names, option hash and G_SHAP table identity (ConfigRecord).

For your own ClientApp: :func:`pack_reply` (a :class:`~livar_merge.ClientUpdate` as a reply),
:func:`load_global_tensors` and :func:`from_array_record` (the broadcast global model into your
peft model), :func:`validate_reply`/:class:`ReplySpec` (what the strategy checks);
``examples/custom_client_app.py`` is a runnable one.
"""

from livar_merge.federated.global_state import load_global_tensors
from livar_merge.federated.server import FederatedServer
from livar_merge.flower.messages import (
    PROTOCOL,
    InvalidReplyError,
    ReplySpec,
    from_array_record,
    pack_moments,
    pack_reply,
    to_array_record,
    unpack_reply,
    validate_reply,
)
from livar_merge.flower.strategy import FlowerSettings, LivarStrategy, RoundFailedError

__all__ = [
    "PROTOCOL",
    "FederatedServer",
    "FlowerSettings",
    "InvalidReplyError",
    "LivarStrategy",
    "ReplySpec",
    "RoundFailedError",
    "from_array_record",
    "load_global_tensors",
    "pack_moments",
    "pack_reply",
    "to_array_record",
    "unpack_reply",
    "validate_reply",
]
