"""Decoding: one draft-and-verify loop, its drafters and acceptance rules, KV-cache helpers."""
