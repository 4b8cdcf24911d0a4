"""The /rerank microservice on the shared core: ``create_app(settings)`` in :mod:`service.app`,
``instructrec serve`` in :mod:`service.cli`. Never imports ``training``."""
