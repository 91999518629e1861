"""What every training job shares, whichever task it runs (pre-training or fine-tuning).

Kept import-light: importing ``runtime`` itself loads nothing heavy, each module is
imported on its own: ``dist`` (process group and ``DistInfo``), ``ds_config`` (the one
DeepSpeed config builder), ``checkpoint`` (DeepSpeed tag directories,
``trainer_state.json`` and each rank's state file, atomic ``latest``, the resume resolver),
``checkpoint_path`` (what a user names as a checkpoint), ``redact`` (credentials), ``rng``
(seeding, every rank's random state, data-loader seeds), ``metrics`` (metrics.jsonl, cut
back on resume), ``preemption`` (the one stop flag), ``memory`` (model-state memory under
DeepSpeed's ZeRO estimators), ``lockstep`` (every rank in every forward pass of an
evaluation, as ZeRO-3 needs), ``param_groups`` (the one AdamW param-group builder:
weight-decay exclusions, layer decay, DCN/backbone/head multipliers, each group's
``lr_scale``) and ``schedules`` (the lr schedules, which apply ``lr_scale``), ``loop`` (the
one training loop with task hooks)."""
