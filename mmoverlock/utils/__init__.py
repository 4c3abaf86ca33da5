from .safe_checkpoint import UnsafeCheckpointError, safe_load, trust_checkpoint

__all__ = ['UnsafeCheckpointError', 'safe_load', 'trust_checkpoint']
