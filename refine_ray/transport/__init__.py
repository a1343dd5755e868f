"""What the roles and the driver exchange, below both: transport batches (contiguous numpy
through the object store), versioned weight sync (one file per backend: sender, receiver,
publisher) and checkpoint files (manifest, pickle-free state)."""
