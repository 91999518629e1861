"""The names of a run directory's checkpoint layout, in a module that imports nothing:
the SLURM batch script's exit trap (launch/slurm/after_exit.py) reads them on a node
where importing torch costs seconds while the job waits on it."""

CHECKPOINTS_DIR = "checkpoints"  # a run directory's folder of checkpoints
LATEST = "latest"  # DeepSpeed's name for the file that names the newest tag
TRAINER_STATE = "trainer_state.json"  # a checkpoint's run-wide state, written by rank 0
SAVED_AT = "saved_at"  # trainer state: rank 0's clock when it wrote it (one per save)
STAGING = ".tmp-"  # in the name of a folder a checkpoint is written into (or swapped out)
