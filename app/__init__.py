"""The mipp team service: FastAPI routes, ORM models, settings, storage and auth.

Importing this package never imports torch: the API process only stores and checks files.
"""
