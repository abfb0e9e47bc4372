"""The trainable TFLite export: the graph builder (one node per layer, a registry of handlers),
backward passes written in TFLite builtin ops (:mod:`edgekit.trainable._grad_ops`), the weight-name
contract shared with the devices and with federated runs, and :func:`export_trainable`.

May import: ``edgekit.export``, ``edgekit.artifacts``, ``edgekit.loading`` and below, and
``device_agents`` (the artifact is verified with the device's own :class:`~device_agents.Trainer`).
"""
