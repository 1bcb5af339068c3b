"""A running deployment: Ray, both pools, the engine and the gRPC frontend, started and stopped together."""
from __future__ import annotations

from dataclasses import dataclass

import structlog

from orchestrator.core.config import Config

log = structlog.get_logger("deployment")


@dataclass
class Deployment:
    """`async with Deployment(cfg) as dep:` then talk to `dep.target` with the client library."""

    cfg: Config
    host: str | None = None
    port: int | None = None  # None: the config's port; 0: any free port
    metrics_port: int | None = None  # the same for the Prometheus endpoint
    api_key: str | None = None  # inference calls need it as a bearer token; None: no authentication
    http_port: int | None = None  # the OpenAI-compatible door's port, as metrics_port

    async def __aenter__(self) -> "Deployment":
        import ray

        from model.loaded import load_model
        from orchestrator.core.correction import Corrections
        from orchestrator.core.predictor import Predictor
        from orchestrator.core.router import Router
        from orchestrator.serving.engine import Engine
        from orchestrator.serving.frontend import start_frontend
        from orchestrator.serving.perfmodel import live_deployment
        from orchestrator.serving.pools import build_pools, init_ray

        self._owns_ray = not ray.is_initialized()
        init_ray(self.cfg)
        lm = load_model()  # memory-mapped: the frontend needs only the tokenizer and the shapes
        self.pools = await build_pools(self.cfg)
        perf, _ = live_deployment(self.cfg.model_name)
        router = Router(self.cfg.router_policy, Predictor(Corrections(self.cfg.router_quantile)),
                        local_prefill_max_tokens=self.cfg.router_local_prefill_max_tokens)
        self.engine = Engine(self.pools, router, perf, self.cfg.decode.max_batch, self.cfg.prefill.token_budget,
                             self.cfg.prefill.max_batch, max_migrations=self.cfg.router_max_migrations,
                             stall_timeout_s=self.cfg.router_stall_timeout_s,
                             local_chunk_tokens=self.cfg.router_local_prefill_chunk_tokens)
        await self.engine.start()
        cfg_model = lm.weights.config
        try:
            self.frontend = await start_frontend(self.cfg, self.engine, lm.tokenizer, cfg_model.context_length,
                                                 cfg_model.n_layers, self.host, self.port, self.metrics_port,
                                                 self.api_key, self.http_port)
        except BaseException:  # no frontend: stop what was started, as __aexit__ would
            await self._stop_pools()
            raise
        self.target, self.metrics_url = self.frontend.target, self.frontend.metrics_url
        self.http_url = self.frontend.http_url
        return self

    async def __aexit__(self, *exc) -> None:
        await self.frontend.stop(self.cfg.frontend.shutdown_grace_s)
        await self._stop_pools()

    async def _stop_pools(self) -> None:
        import ray

        from orchestrator.serving.pools import shutdown_pools

        await self.engine.stop()
        shutdown_pools(self.pools)
        if self._owns_ray:
            ray.shutdown()

    async def wait_for_termination(self) -> None:
        await self.frontend.server.wait_for_termination()
