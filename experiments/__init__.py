"""vlsafe experiments package."""
