"""SLURM launching through submitit: cluster profiles, executors, the requeueable job.

Only this package (and `launch/commands/submit.py`) imports submitit; the training code
it runs is the same `internimage pretrain|finetune` a user starts by hand.
"""
