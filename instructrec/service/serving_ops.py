"""GET /health, /ready and /metrics: what the probes and the scraper read (:class:`ServingOps`)."""

from __future__ import annotations

from instructrec.templates import TEMPLATE_VERSION

from .schemas import Health, HealthFailed, NotReady, Ready, ServedModel
from .serving import Serving


class ServingOps(Serving):
    """The service's own state as answers; the edge turns ``HealthFailed`` and ``NotReady`` into 503s."""

    def health(self) -> Health | HealthFailed:
        """Liveness: failed only when the model could not be loaded (loading is alive)."""
        if self.state.load_error:
            return HealthFailed.model_construct(status="failed", error=self.state.load_error)
        return Health.model_construct(status="ok")

    def ready(self) -> Ready | NotReady:
        state = self.state
        if not state.ready:
            fields = {"status": "failed" if state.load_error else "loading", "model": state.model_name}
            if state.load_error:
                fields["error"] = state.load_error
            return NotReady.model_construct(**fields)
        engine, cache = state.engine, state.cache
        return Ready.model_construct(
            status="ready",
            model=ServedModel.model_construct(**engine.model_info(), device=str(engine.loaded.device),
                                              precision=engine.loaded.precision),
            template_version=TEMPLATE_VERSION,
            cache="disabled" if not cache.enabled else ("up" if cache.up else "down"),
            queue=state.batcher.depth,
            hybrid_version=engine.hybrid.version if engine.hybrid else None,
        )

    def exposition(self) -> tuple[bytes, str]:
        """The Prometheus exposition and its content type."""
        return self.state.metrics.expose()
