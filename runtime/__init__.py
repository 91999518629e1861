"""What every training job shares, whichever task it runs (pre-training or fine-tuning).

Kept import-light: importing ``runtime`` itself loads nothing heavy, each module is imported
on its own (``runtime.checkpoint_path``, ``runtime.redact``).
"""
