"""Input data: Parquet shards read for labelling, training and evaluation (`data.inputs`), and the
built-in data sets (`data.builtin`)."""
