"""The orchestrator's settings, read and validated from cluster.yaml's `metadata:` key.

Invalid config fails at load with the file, the key and the reason (ConfigError).
"""
from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hardware.profiles import canonical_name
from orchestrator.core.router import POLICIES
from orchestrator.core.sla import SLATarget


class ConfigError(ValueError):
    """cluster.yaml is unusable; the message names the file and key."""


@dataclass(frozen=True, slots=True)
class PoolConfig:
    workers: int
    hardware: str
    ray_resources: dict[str, float]
    num_cpus: float
    blas_threads: int
    max_batch: int
    token_budget: int = 0  # prefill only
    kv_capacity_tokens: int = 0  # decode only
    block_tokens: int = 16  # decode only
    kv_host: str = "127.0.0.1"  # decode only: where its KV receiver listens; 0.0.0.0 = every interface


@dataclass(frozen=True, slots=True)
class FrontendConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    max_message_bytes: int = 4 * 1024 * 1024
    max_concurrent_requests: int = 256
    metrics_port: int | None = 9400  # Prometheus text at http://host:metrics_port/metrics; None = off
    http_port: int | None = 8000  # the OpenAI-compatible HTTP door (orchestrator/serving/openai_http.py); None = off
    shutdown_grace_s: float = 30.0  # on stop, streams in flight get this long to finish
    tls: tuple[Path, Path] | None = None  # (certificate chain, private key) PEM files; None = plaintext


MIN_TOKEN_CHARS = 16  # a KV transfer token shorter than this is refused


@dataclass(frozen=True, slots=True)
class KVTransferConfig:
    token: str | None = field(default=None, repr=False)  # None: PDORCH_KV_TOKEN, else generated at start
    tls: tuple[Path, Path] | None = None  # (certificate chain, private key) PEM files; None = plaintext


@dataclass(frozen=True, slots=True)
class WorkloadConfig:
    trace: Path
    requests: int
    max_prompt_tokens: int
    max_output_tokens: int
    target_rate: float | None  # requests/s; None ("auto"): capacity_fraction x the predicted capacity
    seed: int = 0
    capacity_fraction: float = 0.6  # of the pools' capacity on this host (orchestrator/simulator/capacity.py)


@dataclass(frozen=True, slots=True)
class Config:
    path: Path
    model_name: str
    max_tokens_limit: int
    prefill: PoolConfig
    decode: PoolConfig
    frontend: FrontendConfig
    router_policy: str
    router_quantile: float  # the predictor's confidence: a request is admitted when its bounds at it meet the SLA
    router_local_prefill_max_tokens: int  # longest prompt a decode worker may prefill itself (0: never)
    router_local_prefill_chunk_tokens: int  # a local prefill runs this many tokens after each step (0: whole)
    router_max_migrations: int  # placements a request may get after its first when workers die under it
    router_stall_timeout_s: float  # a decode worker with requests on it, silent this long, is lost
    sla_classes: dict[str, SLATarget]  # name -> its targets (SLATarget.sla_class is the name)
    default_sla_class: str
    workload: WorkloadConfig
    metadata: dict[str, Any] = field(repr=False)  # the raw metadata tree (experiments read their part)
    kv_transfer: KVTransferConfig = KVTransferConfig()

    @property
    def local_resources(self) -> dict[str, float]:
        """Custom resources a local Ray instance must fake so both pools can be placed."""
        total: dict[str, float] = {}
        for pool in (self.prefill, self.decode):
            for name, amount in pool.ray_resources.items():
                total[name] = total.get(name, 0) + amount * pool.workers
        return total


class ConfigReader:
    """Typed access to a YAML mapping that reports `file: key: reason` on any problem."""

    def __init__(self, path: Path, tree: Any, prefix: str):
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: {prefix or 'top level'}: expected a mapping")
        self.path, self.tree, self.prefix = path, tree, prefix

    def error(self, key: str, reason: str) -> ConfigError:
        return ConfigError(f"{self.path}: {self.prefix}{key}: {reason}")

    def sub(self, key: str) -> "ConfigReader":
        if key not in self.tree:
            raise self.error(key, "missing")
        return ConfigReader(self.path, self.tree[key], f"{self.prefix}{key}.")

    def get(self, key: str, kind: type, default: Any = ..., minimum: float | None = None) -> Any:
        if key not in self.tree:
            if default is ...:
                raise self.error(key, "missing")
            return default
        value = self.tree[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            raise self.error(key, f"expected {kind.__name__}, got {value!r}")
        if minimum is not None and value < minimum:
            raise self.error(key, f"must be >= {minimum}, got {value!r}")
        return value

    def hardware(self, key: str, default: Any = ...) -> str:
        """A hardware profile name, as written (`cs3` is the newest CS-3 generation); an unknown name or
        generation fails here, naming the known ones (hardware/profiles.py canonical_name)."""
        value = self.get(key, str, default)
        try:
            canonical_name(value)
        except ValueError as e:
            raise self.error(key, str(e).removeprefix("hardware: ")) from None
        return value

    def choice(self, key: str, value: str, choices: tuple[str, ...], what: str) -> str:
        """`value` (read from `key`) if it is one of `choices`, else the error naming them."""
        if value not in choices:
            raise self.error(key, f"unknown {what} {value!r}; choose one of {', '.join(choices)}")
        return value

    def many(self, key: str, kind: type, default: Any = ..., minimum: float | None = None) -> tuple:
        """A value or a list of values (a sweep), each checked like get()."""
        value = self.tree.get(key, default)
        if value is ...:
            raise self.error(key, "missing")
        items = value if isinstance(value, list) else [value]
        if not items:
            raise self.error(key, "empty list")
        return tuple(ConfigReader(self.path, {key: x}, self.prefix).get(key, kind, minimum=minimum) for x in items)


def is_port(value: int) -> bool:
    """A TCP port to bind, 0 (a free one) included."""
    return 0 <= value <= 65535


def _port(r: ConfigReader, key: str, default: int) -> int:
    port = r.get(key, int, default, minimum=0)
    if not is_port(port):
        raise r.error(key, f"must be <= 65535, got {port}")
    return port


def _tls(r: ConfigReader, config_dir: Path) -> tuple[Path, Path] | None:
    """tls_cert_file and tls_key_file (PEM, relative to the config's folder): both or neither."""
    given = [k for k in ("tls_cert_file", "tls_key_file") if r.tree.get(k) is not None]
    if not given:
        return None
    if len(given) == 1:
        missing = ({"tls_cert_file", "tls_key_file"} - set(given)).pop()
        raise r.error(missing, f"required with {given[0]} (TLS needs both)")
    files = []
    for key, marker in (("tls_cert_file", "-----BEGIN CERTIFICATE-----"), ("tls_key_file", "PRIVATE KEY-----")):
        f = Path(r.get(key, str))
        f = f if f.is_absolute() else config_dir / f
        try:
            text = f.read_text(errors="replace")
        except OSError as e:
            raise r.error(key, f"cannot read {f}: {e.strerror}") from None
        if marker not in text:
            raise r.error(key, f"{f} is not a PEM file with a {marker.strip('-').lower()}")
        files.append(f.resolve())
    return files[0], files[1]


def _kv_transfer(r: ConfigReader, config_dir: Path) -> KVTransferConfig:
    """token (a string, never echoed in an error) and the TLS files, read as the frontend's are."""
    token = r.tree.get("token")
    if token is not None and (not isinstance(token, str) or len(token) < MIN_TOKEN_CHARS):
        raise r.error("token", f"must be a string of at least {MIN_TOKEN_CHARS} characters (its value is not shown)")
    return KVTransferConfig(token=token, tls=_tls(r, config_dir))


def _pool(r: ConfigReader, kind: str) -> PoolConfig:
    resources = r.get("ray_resources", dict, {})
    for name, amount in resources.items():
        if not isinstance(amount, (int, float)) or amount < 0:
            raise r.error(f"ray_resources.{name}", f"must be a non-negative number, got {amount!r}")
    return PoolConfig(
        workers=r.get("workers", int, minimum=1),
        hardware=r.hardware("hardware", "cpu"),
        ray_resources={k: float(v) for k, v in resources.items()},
        num_cpus=r.get("num_cpus", float, 1.0, minimum=0),
        blas_threads=r.get("blas_threads", int, 1, minimum=1),
        max_batch=r.get("max_batch", int, 64 if kind == "decode" else 8, minimum=1),
        token_budget=r.get("token_budget", int, 4096, minimum=1) if kind == "prefill" else 0,
        kv_capacity_tokens=r.get("kv_capacity_tokens", int, 65536, minimum=1) if kind == "decode" else 0,
        block_tokens=r.get("block_tokens", int, 16, minimum=1) if kind == "decode" else 16,
        kv_host=_ip_address(r, "kv_host") if kind == "decode" else "127.0.0.1",
    )


def _ip_address(r: ConfigReader, key: str) -> str:
    value = r.get(key, str, "127.0.0.1")
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise r.error(key, f"must be an IP address (127.0.0.1 on one machine, 0.0.0.0 for every interface), "
                           f"got {value!r}") from None
    return value


def _source_checkout() -> Path | None:
    """The project checkout an editable install points at (a Ray job runs from a copy elsewhere)."""
    import importlib.metadata
    import json
    from urllib.parse import urlparse

    for dist in importlib.metadata.distributions(name="pdorchestrator"):
        text = dist.read_text("direct_url.json")  # absent from a stray egg-info in the working dir
        url = json.loads(text).get("url", "") if text else ""
        if url.startswith("file://"):
            return Path(urlparse(url).path)
    return None


def resolve_data_path(rel: Path, config_dir: Path) -> Path:
    """A relative data path is taken from the config's folder, else from the source checkout
    (so `ray job submit --working-dir .` finds ../shared/data from its uploaded copy too)."""
    if rel.is_absolute():
        return rel
    candidates = [config_dir / rel]
    checkout = _source_checkout()
    if checkout is not None:
        candidates.append(checkout / rel)
    for c in candidates:
        if c.exists():
            return c.resolve()
    return candidates[0].resolve()


def parse_config(tree: Any, path: Path) -> Config:
    top = ConfigReader(path, tree, "")
    meta = top.sub("metadata")
    model = meta.sub("model")
    pools = meta.sub("pools")
    fe = meta.sub("frontend") if "frontend" in meta.tree else ConfigReader(path, {}, "metadata.frontend.")
    router = meta.sub("router") if "router" in meta.tree else ConfigReader(path, {}, "metadata.router.")
    kv = ConfigReader(path, {}, "metadata.kv_transfer.") if meta.tree.get("kv_transfer") is None \
        else meta.sub("kv_transfer")  # None: every key commented out
    policy = router.choice("policy", router.get("policy", str, "sla"), POLICIES, "policy")
    quantile = router.get("quantile", float, 0.9)
    if not 0.0 < quantile < 1.0:
        raise router.error("quantile", f"must be in (0, 1), got {quantile}")
    local_prefill = router.get("local_prefill_max_tokens", int, 0, minimum=0)
    local_chunk = router.get("local_prefill_chunk_tokens", int, 0, minimum=0)
    max_migrations = router.get("max_migrations", int, 3, minimum=0)
    stall_timeout = router.get("stall_timeout_s", float, 2.0)
    if not 0.5 <= stall_timeout < math.inf:  # NaN fails too; a live worker answers its output poll every 0.5 s
        raise router.error("stall_timeout_s", f"must be at least 0.5 (seconds), got {stall_timeout}")
    slas_r = meta.sub("sla_classes")
    slas = {}
    for name in slas_r.tree:
        s = slas_r.sub(name)
        slas[name] = SLATarget(ttft_ms=s.get("ttft_ms", float, minimum=1e-9),
                               tpot_ms=s.get("tpot_ms", float, minimum=1e-9),
                               priority=s.get("priority", int, 0), sla_class=str(name))
    default_sla = meta.get("default_sla_class", str, next(iter(slas), ""))
    if default_sla not in slas:
        raise meta.error("default_sla_class", f"{default_sla!r} is not one of the sla_classes {sorted(slas)}")
    wl = meta.sub("workload")
    trace = resolve_data_path(Path(wl.get("trace", str)), path.parent)
    host = fe.get("host", str, "127.0.0.1")
    metrics_port = None if fe.tree.get("metrics_port", ...) is None else _port(fe, "metrics_port", 9400)
    http_port = None if fe.tree.get("http_port", ...) is None else _port(fe, "http_port", 8000)
    return Config(
        path=path,
        model_name=model.get("name", str),
        max_tokens_limit=model.get("max_tokens_limit", int, 1024, minimum=1),
        prefill=_pool(pools.sub("prefill"), "prefill"),
        decode=_pool(pools.sub("decode"), "decode"),
        frontend=FrontendConfig(
            host=host, port=_port(fe, "port", 50051), metrics_port=metrics_port, http_port=http_port,
            shutdown_grace_s=fe.get("shutdown_grace_s", float, 30.0, minimum=0.0), tls=_tls(fe, path.parent),
            max_message_bytes=fe.get("max_message_bytes", int, 4 * 1024 * 1024, minimum=1024),
            max_concurrent_requests=fe.get("max_concurrent_requests", int, 256, minimum=1)),
        router_policy=policy,
        router_quantile=quantile,
        router_local_prefill_max_tokens=local_prefill,
        router_local_prefill_chunk_tokens=local_chunk,
        router_max_migrations=max_migrations,
        router_stall_timeout_s=stall_timeout,
        sla_classes=slas,
        default_sla_class=default_sla,
        workload=WorkloadConfig(
            trace=trace, requests=wl.get("requests", int, minimum=1),
            max_prompt_tokens=wl.get("max_prompt_tokens", int, 512, minimum=1),
            max_output_tokens=wl.get("max_output_tokens", int, 64, minimum=1),
            target_rate=None if wl.tree.get("target_rate", "auto") == "auto" else
            wl.get("target_rate", float, minimum=1e-9),
            seed=wl.get("seed", int, 0),
            capacity_fraction=wl.get("capacity_fraction", float, 0.6, minimum=1e-9)),
        metadata=meta.tree,
        kv_transfer=_kv_transfer(kv, path.parent),
    )


def read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None


def load_config(path: str | Path) -> Config:
    path = Path(path)
    return parse_config(read_yaml(path), path)
