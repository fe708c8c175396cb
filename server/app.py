"""Wires a running Quiver server: model -> engine -> gRPC service + health + reflection.

`Server.start()` loads the model (health NOT_SERVING until then), starts the engine thread
and the gRPC server; `stop()` drains them. Used by `quiver serve` and by the tests.
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
from quiver.server.pb import quiver_pb2, quiver_pb2_grpc
from quiver.server.service import QuiverService

log = logging.getLogger(__name__)
SERVICE_NAME = quiver_pb2.DESCRIPTOR.services_by_name["Quiver"].full_name  # "quiver.v1.Quiver"


class Server:
    def __init__(self, server_cfg: ServerConfig, model_cfg: ModelConfig, engine_cfg: EngineConfig,
                 loaded: LoadedModel | None = None):
        self.server_cfg, self.model_cfg, self.engine_cfg = server_cfg, model_cfg, engine_cfg
        self.loaded = loaded
        self.engine: Engine | None = None
        self.grpc: grpc.Server | None = None
        self.health = health.HealthServicer()
        self.port = server_cfg.port

    def start(self) -> int:
        """Binds the port, loads the model, serves; returns the bound port."""
        cfg = self.server_cfg
        self.grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=cfg.max_workers))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc)
        self.service = QuiverService(None)  # answers UNAVAILABLE until the engine runs
        quiver_pb2_grpc.add_QuiverServicer_to_server(self.service, self.grpc)
        self.port = self.grpc.add_insecure_port(f"{cfg.host}:{cfg.port}")
        if self.port == 0:
            raise RuntimeError(f"could not bind {cfg.host}:{cfg.port}")
        self.grpc.start()  # health answers NOT_SERVING while the model loads
        if self.loaded is None:
            self.loaded = load_model(self.model_cfg)
        adapters = self._adapters()
        self.engine = Engine(self.loaded, self.engine_cfg, adapters=adapters)
        self.engine.start()
        self.service.adapters = adapters
        self.service.engine = self.engine
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %s on %s:%d", self.loaded.name, cfg.host, self.port)
        return self.port

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

    def wait(self) -> None:
        if self.grpc is not None:
            self.grpc.wait_for_termination()
