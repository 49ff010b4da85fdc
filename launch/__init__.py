"""Process and cluster environment -> torch.distributed settings; job submission helpers."""

from .env import DistEnv, backend_for, detect_env, device_for, expand_nodelist, exported_env, first_host, free_port

__all__ = ["DistEnv", "backend_for", "detect_env", "device_for", "expand_nodelist", "exported_env", "first_host",
           "free_port"]
