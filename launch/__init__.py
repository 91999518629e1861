"""The `internimage` command line, typed configuration, and local/SLURM launchers."""
