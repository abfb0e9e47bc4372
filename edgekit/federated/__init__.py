"""Federated learning with Flower: settings (:mod:`~edgekit.federated.config`), run preparation, ``run.json`` and
the shared run tail (:mod:`~edgekit.federated.run`), the round loop (:mod:`~edgekit.federated.server_app`) and the
ServerApps that run it (:mod:`~edgekit.federated.server_apps`), the strategy registry, robustness, privacy and
secure aggregation; the three ways to run rounds side by side: ``fl simulate`` (:mod:`~edgekit.federated.simulate`),
``fl up`` (:mod:`~edgekit.federated.deploy`) and ``fl run`` on a served fleet (:mod:`~edgekit.federated.fleet_run`);
Flower's processes started one way (:mod:`~edgekit.federated.processes`, :mod:`~edgekit.federated.tls`).

The wire keys both sides use are :mod:`device_agents.protocol`'s.

May import: every other ``edgekit`` package below ``fleet`` (it closes the loop through :func:`edgekit.compress`)
and ``device_agents`` (the ClientApp and the evaluator are the device's code). Never the package face ``edgekit``.
"""
