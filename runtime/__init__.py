"""What every training job shares, whichever task it runs (pre-training or fine-tuning).

Kept import-light: importing ``runtime`` itself loads nothing heavy, each module is imported
on its own: ``checkpoint_path`` (what a user names as a checkpoint), ``redact``
(credentials), ``rng`` (seeding, every rank's random state, data-loader seeds), ``metrics``
(metrics.jsonl, cut back on resume), ``preemption`` (the one stop flag).
"""
