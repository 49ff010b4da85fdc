"""Process and cluster environment -> torch.distributed settings; job submission helpers."""
