"""Data for VLsI distillation: the synthetic shapes task, its Parquet shards, and batch collation.

- ``synthetic``: seeded generator of grid images with coloured shapes and multiple-choice questions.
- ``shards``: Parquet writer/reader with per-row validation and a cached, manifest-described dataset.
- ``collate``: turns rows into model batches.

Nothing heavy is imported here; import the submodule you need.
"""
