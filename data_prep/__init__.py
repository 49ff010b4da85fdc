"""Turning raw data into WebDataset shards: shard writing, the demo corpus, validation, stats.

Command line: ``python -m data_prep {shard,build-demo,validate,stats} ...`` (also the ``perceiver-data`` script).
"""
