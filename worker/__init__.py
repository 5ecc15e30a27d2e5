"""The Celery worker: claims a job row, runs the engine, stores the results.

torch and the engine are imported inside the task (worker.runner), never at import time:
CUDA initialised in the prefork parent breaks the forked children.
"""
