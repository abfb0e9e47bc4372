"""Federated learning with Flower: the ServerApp, strategies and the simulation driver."""
