"""LIVAR on Flower (``flwr`` 1.41 Message API): strategy, ServerApp/ClientApp, simulation.

Only this subpackage imports ``flwr`` (install the ``flower`` extra). Modules:

``messages``    wire format of the global model and of a client reply; ``validate_reply``
``strategy``    :class:`~livar_merge.flower.strategy.LivarStrategy` (our aggregation registry)
``app``         ``server_app`` / ``client_app``, the components named in ``pyproject.toml``
``simulation``  ``livar-fed --engine flower``: the App on the Simulation Engine

What travels each round (see ``messages`` for the keys):

* server -> client: the global model as one ArrayRecord (LoRA factors, head, and with
  ``lora_merge="product"`` the frozen weights of the LoRA layers, into which every round's merged
  update is folded) and a ConfigRecord with the round, the resolved ``livar-fed`` options
  (JSON), the statistics the method needs and a checksum of the frozen backbone;
* client -> server: LoRA factors and head (ArrayRecord), omega_A/omega_B per layer, per-class
  feature variance, presence and counts, sample count and training metrics (MetricRecord), and
  client id, partition id, layer names, option hash and G_SHAP table identity (ConfigRecord).
"""
