"""Models: loading, settings, sharding, attention over packed rows, log-probs, generation and the export."""
