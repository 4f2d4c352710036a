"""Evaluation: benchmark loaders, metrics exactly as lmms-eval / VLMEvalKit compute them, tasks and the runner."""

from .datasets import Item
from .runner import evaluate, load_predictions, rescore
from .tasks import TASKS, Task, get_task

__all__ = ["Item", "Task", "TASKS", "get_task", "evaluate", "rescore", "load_predictions"]
