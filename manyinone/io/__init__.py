"""Files: durable writes, checksums, checkpoints and their index, model loading, export, the load API."""
