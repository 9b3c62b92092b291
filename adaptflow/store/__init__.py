"""Where bytes live: every read and write (storage), the bytes and time each task spends (accounting), sharded
Parquet stores keyed by image (shards, rows), and the store's folder layout (layout)."""
