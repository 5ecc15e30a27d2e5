"""The service core: what the HTTP routes and the worker both call.

`app.core.jobs` holds every state change of a job (submit, send, claim, progress, cancel,
final write, sweep, orphan recovery, reconcile); `app.core.inputs` deletes models and
datasets without racing a submit; `app.core.scratch` names and cleans temporary folders.
Nothing here imports FastAPI or torch: the worker imports the core, the ORM models
(`app.models`), the database (`app.db`), the settings, the store and the queue, never the
HTTP layer (`app.main`, `app.routes`, `app.deps`, `app.schemas`).
"""
