"""ragdec: fast retrieval-augmented and conversational answering.

Heavy libraries (torch, transformers, faiss) are imported where they are used, so that
importing ragdec and running ``ragdec --help`` stay fast.
"""

__version__ = "0.1.0"
