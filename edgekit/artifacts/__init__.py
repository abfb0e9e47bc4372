"""What edgekit hands over: ``manifest.json`` (one schema for inference and trainable outputs),
``report.md`` with its PNG plots, and the inspection of an artifact or an output folder.

May import: ``edgekit.export``, ``edgekit.loading`` and below, and ``device_agents`` (the manifest
file name and schema version are the device's; inspection loads artifacts with the device runtime).
"""
