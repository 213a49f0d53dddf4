"""First-party connectors (CSV, Parquet, SQL, Segment JSONL, in-memory frames), each a pluggy plugin."""
