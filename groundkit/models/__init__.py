"""groundkit.models."""
