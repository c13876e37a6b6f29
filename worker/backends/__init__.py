"""Model backends: one interface, so prompts and parsing give the same answer on every backend."""
