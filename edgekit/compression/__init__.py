"""Compression: the search over recipes (:mod:`~edgekit.compression.search`), each candidate run
(:mod:`~edgekit.compression.candidates`) on the model its recipe builds (:mod:`~edgekit.compression.models`).

>>> from edgekit.compression import compress
"""

from edgekit.compression.search import compress

__all__ = ["compress"]
