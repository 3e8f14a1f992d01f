"""The architectures, one per file, composed from layers/."""
