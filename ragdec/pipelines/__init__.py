"""Pipelines: Request/Chunk types, the Pipeline protocol, RAG, chat, PiD, router."""
