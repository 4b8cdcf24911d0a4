"""GET /health, /ready and /metrics: what the probes and the scraper read; POST /admin/reload: a model
swap while serving (:class:`ServingOps`)."""

from __future__ import annotations

from instructrec.templates import TEMPLATE_VERSION

from .errors import ApiError
from .schemas import (Health, HealthFailed, ModelInfo, NotReady, Ready, ReloadRequest, ReloadResponse, ServedModel,
                      TitleVectorsProgress)
from .serving import Serving
from .state import SwapRefused, SwapRunning


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
            **({"model_swaps": state.swaps} if state.swaps else {}),
            **({"title_vectors": TitleVectorsProgress.model_construct(
                done=vectors.done, total=vectors.total, seconds_left=vectors.eta_seconds())}
               if (vectors := engine.title_vectors).computing else {}),
        )

    async def reload(self, req: ReloadRequest) -> ReloadResponse:
        """Swap the model while serving; 409 while a swap runs, 422 naming ``model`` when it cannot be served."""
        try:
            previous, engine, seconds = await self.state.reload(req.model)
        except SwapRunning as exc:
            raise ApiError(409, "swap_running", str(exc), headers={"Retry-After": "5"}, reason="swap_running") from None
        except SwapRefused as exc:
            raise ApiError(422, "validation_error", f"model: {exc}", "model", reason="invalid") from None
        return ReloadResponse.model_construct(status="swapped", model=ModelInfo.model_construct(**engine.model_info()),
                                              previous=ModelInfo.model_construct(**previous.model_info()),
                                              model_swaps=self.state.swaps, seconds=round(seconds, 3))

    def exposition(self) -> tuple[bytes, str]:
        """The Prometheus exposition and its content type."""
        return self.state.metrics.expose()
