"""Request queues, dynamic batching and the model thread."""

from .batcher import DeadlineExpired, DynamicBatcher, Engine, QueueFull, WorkItem
from .types import BatchKey, Work

__all__ = ["BatchKey", "DeadlineExpired", "DynamicBatcher", "Engine", "QueueFull", "Work", "WorkItem"]
