"""Webdataset shard I/O shared by every task (pre-training, streamed classification,
zero-shot evaluation).

Kept import-light: each module is imported on its own. ``config`` (object storage access
and retries, the ``check`` helper of typed configs), ``storage`` (opening local, ``s3://``
and ``pipe:`` shards with retries and ranged reads), ``tar_stream`` (a checksummed tar
reader that reports where it broke), ``sources`` (shard URL lists, raw samples of one
shard and which member of a sample to read), ``shard_schedule`` (the fault policy: retry
later, never lose a source), ``stats`` (skip accounting across worker processes),
``state`` (seeds and rank info), ``stream`` (resumable per-slot sample streams, mixed and
shuffled), ``loader`` (the resumable multi-worker loader of a rank, given a task's codec),
``shard_writer`` (image folder + captions -> shards),
``demo`` (the built-in digits demo shards every task's demo reads).
"""
