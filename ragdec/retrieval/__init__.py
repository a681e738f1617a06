"""Retrieval: E5 embedder, FAISS index, SQLite document store, ingestion."""
