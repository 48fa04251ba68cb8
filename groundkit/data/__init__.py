"""groundkit.data."""
