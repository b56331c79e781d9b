"""vlsafe analysis package."""
