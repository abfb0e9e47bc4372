"""Federated learning with Flower: settings (:mod:`~edgekit.federated.config`), run preparation and
the shared run tail (:mod:`~edgekit.federated.run`), the round loop of the ServerApp
(:mod:`~edgekit.federated.server_app`), the strategy registry, secure aggregation, simulation on
Ray, and a real SuperLink/SuperNode deployment with TLS (:mod:`~edgekit.federated.deploy`,
:mod:`~edgekit.federated._tls`).

May import: every other ``edgekit`` package (it closes the loop through :func:`edgekit.compress`) and
``device_agents`` (the ClientApp and the evaluator are the device's code). Never the package face
``edgekit`` itself.
"""
