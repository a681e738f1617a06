"""SQLite QA cache: exact, semantic and near hits."""
