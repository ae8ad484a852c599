"""The Celery side: task declarations, what a worker process keeps, the instant path."""
