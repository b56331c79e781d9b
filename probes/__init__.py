"""vlsafe probes package."""
