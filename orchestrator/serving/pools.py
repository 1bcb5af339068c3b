"""Builds the prefill and decode pools as Ray actors from the config, on a local or existing Ray.

Worker classes stay plain; `ray.remote(...).options(...)` is applied only here, and each actor is
put behind the engine's worker interface (orchestrator/serving/workers.py), every RayError of a call
becoming WorkerUnavailable.
"""
from __future__ import annotations

import asyncio
import ipaddress
import os
import uuid
import structlog

from orchestrator.core.config import Config
from orchestrator.serving.auth import KVSecurity, kv_security
from orchestrator.serving.workers import Call, DecodeHandle, Pools, PrefillHandle, WorkerUnavailable

log = structlog.get_logger("pools")

# Local Ray must bind loopback and never phone home (../shared/DESIGN.md, "Ray on the development machines").
LOCAL_RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
for _k, _v in LOCAL_RAY_ENV.items():
    os.environ.setdefault(_k, _v)

import ray  # noqa: E402  (after the environment above)
from ray.exceptions import RayError  # noqa: E402


def ray_calls(worker_id: str, actor: "ray.actor.ActorHandle") -> Call:
    """The transport of a worker handle to a Ray actor: a dead or unreachable actor (any RayError)
    raises WorkerUnavailable."""
    async def call(method: str, *args):
        try:
            return await getattr(actor, method).remote(*args)
        except RayError as e:
            raise WorkerUnavailable(worker_id, type(e).__name__) from e
    return call


def init_ray(cfg: Config) -> None:
    """Join the cluster a Ray job runs in, or start a private local Ray sized by the config."""
    if ray.is_initialized():
        return
    runtime_env = {"env_vars": dict(LOCAL_RAY_ENV),
                   "worker_process_setup_hook": "orchestrator.logging_setup.configure_logging"}
    if os.environ.get("RAY_ADDRESS"):  # inside `ray job submit` or pointed at a cluster on purpose
        ray.init(address="auto", runtime_env=runtime_env, log_to_driver=True)
        return
    cpus = cfg.prefill.num_cpus * cfg.prefill.workers + cfg.decode.num_cpus * cfg.decode.workers + 1
    ray.init(address="local", num_cpus=max(int(cpus), os.cpu_count() or 1), resources=cfg.local_resources,
             include_dashboard=False, runtime_env=runtime_env, log_to_driver=True,
             _node_ip_address="127.0.0.1")


def kv_address(bind_host: str, port: int, node_ip) -> str:
    """The address prefill workers dial: the bound host, or this node's IP (node_ip()) when the
    receiver listens on every interface."""
    from kvtransfer.grpc_backend import host_port

    return host_port(node_ip() if ipaddress.ip_address(bind_host).is_unspecified else bind_host, port)


class _Located:
    """Where an actor runs, for what signals its process (the chaos command, failure tests)."""

    async def process(self) -> tuple[str, int]:
        """(Ray node id, pid) of this actor's process."""
        return ray.get_runtime_context().get_node_id(), os.getpid()


def _decode_actor_class():
    from decode.worker import DecodeWorker
    from kvtransfer.grpc_backend import start_kv_server

    class DecodeActor(DecodeWorker, _Located):
        """A DecodeWorker that also hosts its KV receiver (gRPC, on `kv_host`) in the actor's process,
        taking transfers only from senders with the deployment's token (and TLS if configured).
        The receiver starts with the actor, so a restarted actor serves again, on a new port that
        its load() reports."""

        def __init__(self, kv_security: KVSecurity, kv_host: str = "127.0.0.1", **kwargs):
            super().__init__(**kwargs)
            self._kv_server, port = start_kv_server(self.kv_sink, host=kv_host, expected_layout=self.layout,
                                                    token=kv_security.token,
                                                    credentials=kv_security.server_credentials())
            self.kv_target = kv_address(kv_host, port, ray.util.get_node_ip_address)

    return DecodeActor


def _prefill_actor_class():
    from kvtransfer.grpc_backend import GrpcTransferBackend
    from prefill.worker import PrefillWorker

    class PrefillActor(PrefillWorker, _Located):
        """A PrefillWorker whose KV sender presents the deployment's token (and trusts its TLS certificate)."""

        def __init__(self, *args, kv_security: KVSecurity, **kwargs):
            backend = GrpcTransferBackend(token=kv_security.token, credentials=kv_security.channel_credentials())
            super().__init__(*args, transfer_backend=backend, **kwargs)

    return PrefillActor


WORKER_MAX_RESTARTS = 3  # Ray restarts a crashed worker actor this many times; its in-flight requests fail


async def build_pools(cfg: Config) -> Pools:
    """Start every worker, wait until each has loaded the model, and learn the KV receiver addresses."""
    DecodeActor, PrefillActor = _decode_actor_class(), _prefill_actor_class()
    security = kv_security(cfg)

    pools = Pools()
    p, d = cfg.prefill, cfg.decode
    tag = uuid.uuid4().hex[:8]  # actors are named `pdorch.<worker id>.<tag>`: findable in Ray's state API
    for i in range(d.workers):
        wid = f"decode-{i}"
        actor = ray.remote(DecodeActor).options(
            name=f"pdorch.{wid}.{tag}", num_cpus=d.num_cpus, resources=dict(d.ray_resources), max_concurrency=1000,
            max_restarts=WORKER_MAX_RESTARTS).remote(
            capacity_tokens=d.kv_capacity_tokens, block_size=d.block_tokens, max_batch=d.max_batch,
            blas_threads=d.blas_threads, kv_host=d.kv_host, kv_security=security,
            local_chunk_tokens=cfg.router_local_prefill_chunk_tokens)
        pools.decode[wid], pools.actors[wid] = DecodeHandle(wid, ray_calls(wid, actor)), actor
        pools.hardware[wid] = d.hardware
    for i in range(p.workers):
        wid = f"prefill-{i}"
        actor = ray.remote(PrefillActor).options(
            name=f"pdorch.{wid}.{tag}", num_cpus=p.num_cpus, resources=dict(p.ray_resources), max_concurrency=1000,
            max_restarts=WORKER_MAX_RESTARTS).remote(
            wid, token_budget=p.token_budget, max_batch=p.max_batch, blas_threads=p.blas_threads,
            kv_security=security.for_senders())
        pools.prefill[wid], pools.actors[wid] = PrefillHandle(wid, ray_calls(wid, actor)), actor
        pools.hardware[wid] = p.hardware
    loads = await asyncio.gather(*(h.load() for h in pools.decode.values()))
    pools.kv_targets = {w: load.kv_target for w, load in zip(pools.decode, loads)}
    await asyncio.gather(*(h.ready() for h in pools.prefill.values()))
    log.info("pools ready", prefill=list(pools.prefill), decode=list(pools.decode), kv_targets=pools.kv_targets)
    return pools


def shutdown_pools(pools: Pools) -> None:
    for actor in pools.actors.values():
        ray.kill(actor)
