"""Wires a running Quiver server: model -> engine -> gRPC service + health + reflection,
and with `ServerConfig.metrics_port` set, Prometheus metrics over HTTP (server/metrics.py).

`Server.start()` binds the ports, loads the model (health NOT_SERVING until then), starts the
engine thread and the gRPC server; `stop()` drains them and closes the metrics endpoint. Used
by `quiver serve` and by the tests.
"""

from __future__ import annotations

import logging
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from quiver.server.config import EngineConfig, ModelConfig, ServerConfig
from quiver.server.engine.engine import Engine
from quiver.server.loader import LoadedModel, load_model
from quiver.server.metrics import Metrics, MetricsEndpoint, metrics_url
from quiver.server.pb import quiver_pb2, quiver_pb2_grpc
from quiver.server.service import QuiverService

log = logging.getLogger(__name__)
SERVICE_NAME = quiver_pb2.DESCRIPTOR.services_by_name["Quiver"].full_name  # "quiver.v1.Quiver"


class BindError(RuntimeError):
    """A port the server needs cannot be bound (in use, bad host)."""


class Server:
    def __init__(self, server_cfg: ServerConfig, model_cfg: ModelConfig, engine_cfg: EngineConfig,
                 loaded: LoadedModel | None = None):
        self.server_cfg, self.model_cfg, self.engine_cfg = server_cfg, model_cfg, engine_cfg
        self.loaded = loaded
        self.engine: Engine | None = None
        self.grpc: grpc.Server | None = None
        self.health = health.HealthServicer()
        self.port = server_cfg.port
        self.metrics: Metrics | None = None
        self.metrics_endpoint: MetricsEndpoint | None = None
        self.metrics_port: int | None = None  # bound port of /metrics, None without metrics

    def start(self) -> int:
        """Binds the ports, loads the model, serves; returns the bound gRPC port."""
        cfg = self.server_cfg
        self.grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=cfg.max_workers))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc)
        if cfg.metrics_port is not None:
            self.metrics = Metrics()
        self.service = QuiverService(None, metrics=self.metrics)  # answers UNAVAILABLE until the engine runs
        quiver_pb2_grpc.add_QuiverServicer_to_server(self.service, self.grpc)
        self.port = self.grpc.add_insecure_port(f"{cfg.host}:{cfg.port}")
        if self.port == 0:
            raise BindError(f"could not bind {cfg.host}:{cfg.port}")
        if self.metrics is not None:  # before the model loads: a busy port fails at once, not after it
            try:
                self.metrics_endpoint = MetricsEndpoint(self.metrics, cfg.host, cfg.metrics_port)
            except OSError as exc:
                raise BindError(f"could not bind the metrics port {cfg.host}:{cfg.metrics_port}: {exc}") from None
            self.metrics_port = self.metrics_endpoint.port
        self.grpc.start()  # health answers NOT_SERVING while the model loads
        if self.loaded is None:
            self.loaded = load_model(self.model_cfg)
        adapters = self._adapters()
        self.engine = Engine(self.loaded, self.engine_cfg, adapters=adapters)
        self.engine.start()
        if self.metrics is not None:  # after the warm-up: its requests are not counted
            self.metrics.set_model(self.loaded)
            self.metrics.bind(self.engine)
            self.engine.metrics = self.metrics
            if adapters is not None:
                adapters.metrics = self.metrics
        self.service.adapters = adapters
        self.service.engine = self.engine
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %s on %s:%d%s", self.loaded.name, cfg.host, self.port,
                 f"; metrics at {self.metrics_url}" if self.metrics_url else "")
        return self.port

    @property
    def metrics_url(self) -> str | None:
        if self.metrics_port is None:
            return None
        return metrics_url(self.server_cfg.host, self.metrics_port)

    def _adapters(self):
        cfg = self.server_cfg
        if not cfg.adapter_dir:
            return None
        from quiver.adapters.base import BaseSpec
        from quiver.adapters.manager import AdapterConfig, AdapterManager

        loaded = self.loaded
        manager = AdapterManager(AdapterConfig(cfg.adapter_dir, num_slots=cfg.adapter_slots, max_rank=cfg.max_rank,
                                               pinned_mib=cfg.pinned_mib),
                                 BaseSpec.from_model(loaded.model), loaded.name, loaded.dtype, loaded.device)
        log.info("adapters: %d found under %s; %d slots, max rank %d", len(manager.ids()), cfg.adapter_dir,
                 cfg.adapter_slots, cfg.max_rank)
        return manager

    def stop(self, grace: float = 5.0) -> None:
        self.health.enter_graceful_shutdown()
        if self.grpc is not None:
            self.grpc.stop(grace).wait()
        if self.engine is not None:
            self.engine.shutdown()
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.stop()
            self.metrics_endpoint = None

    def wait(self) -> None:
        if self.grpc is not None:
            self.grpc.wait_for_termination()
