"""The names of a run directory's checkpoint layout, in a module that imports nothing:
the SLURM batch script's exit trap (launch/slurm/after_exit.py) reads them on a node
where importing torch costs seconds while the job waits on it."""

CHECKPOINTS_DIR = "checkpoints"  # a run directory's folder of checkpoints
LATEST = "latest"  # DeepSpeed's name for the file that names the newest tag
