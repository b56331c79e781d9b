"""`vlsafe` sub-commands, one module each, discovered by `experiments.cli`."""
