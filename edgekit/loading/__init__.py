"""Loading: the user's model (every saved format, checked before deserializing), the layer registry,
the data (``digits`` or bounded ``.npz`` reads, seeded splits, client partitions) and the small
reference models of the demo, tests and benchmarks.

May import: ``edgekit.errors``, ``edgekit.config``, ``edgekit._tf``, ``edgekit._io``. Nothing above.
"""
