"""groundkit.bench."""
