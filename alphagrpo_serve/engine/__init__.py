"""Request queues, dynamic batching and the model thread."""
from .batcher import DeadlineExpired, DynamicBatcher, Engine, QueueFull, WorkItem

__all__ = ["DeadlineExpired", "DynamicBatcher", "Engine", "QueueFull", "WorkItem"]
