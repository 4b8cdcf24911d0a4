"""The /rerank microservice on the shared core: ``create_app(settings)`` in :mod:`instructrec.service.app`,
``instructrec serve`` in :mod:`instructrec.service.cli`. Never imports ``training``."""
