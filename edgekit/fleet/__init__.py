"""The fleet: signed releases (:mod:`~edgekit.fleet.signing`), a served SuperLink devices enroll with
(:mod:`~edgekit.fleet.serve`), canary rollouts and status over that Flower deployment
(:mod:`~edgekit.fleet.rollout`).

May import: ``edgekit.federated`` (TLS material, process handling, Flower environment) and
``device_agents`` (the release format and the device's handlers). Never the package face ``edgekit``.
"""
