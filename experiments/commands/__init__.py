"""`vlsafe` sub-commands, one module each, discovered by `vlsafe.experiments.cli`."""
