"""The gRPC service quiver.v1.Quiver: converts messages to engine calls and back.

Every failure becomes a gRPC status with a message, never a crash or a hang:
INVALID_ARGUMENT (bad request), NOT_FOUND (unknown adapter), RESOURCE_EXHAUSTED (does not fit),
UNAVAILABLE (shutting down), INTERNAL (a failed engine step), UNIMPLEMENTED (not built yet).
A client that goes away cancels its request in the engine. With metrics, a request refused
here is counted here; one the engine took is counted when the engine finishes it.
"""

from __future__ import annotations

import logging

import grpc

from quiver.adapters.files import AdapterError
from quiver.server.engine.engine import Engine, Event
from quiver.server.metrics import BASE_LABEL, MIX_LABEL, UNKNOWN_LABEL, adapter_label
from quiver.server.pb import quiver_pb2 as pb
from quiver.server.pb import quiver_pb2_grpc as pb_grpc
from quiver.server.requests import GenerateInput, InvalidRequest, encode_prompt

log = logging.getLogger(__name__)


ERROR_CODES = {"unavailable": grpc.StatusCode.UNAVAILABLE, "resource_exhausted": grpc.StatusCode.RESOURCE_EXHAUSTED,
               "internal": grpc.StatusCode.INTERNAL}


class AdapterNotFound(KeyError):
    pass


class QuiverService(pb_grpc.QuiverServicer):
    def __init__(self, engine: Engine | None, adapters=None, metrics=None):
        self.engine = engine
        self.adapters = adapters  # quiver.adapters store, or None: every adapter id is unknown
        self.metrics = metrics  # quiver.server.metrics.Metrics, or None

    # ---- helpers ----
    def _start(self, request, context):
        """Validates and submits; aborts the RPC with the right status on bad input."""
        # the metrics' adapter label: a client's id becomes a label only once it named an adapter on disk
        mix = len(request.adapter_mix) > 0
        label = MIX_LABEL if mix else UNKNOWN_LABEL if request.adapter_id else BASE_LABEL
        if self.engine is None:
            self._abort(context, grpc.StatusCode.UNAVAILABLE, "the model is still loading; retry when health is SERVING",
                        label)
        try:
            inp = GenerateInput.from_proto(request, self.engine.cfg.default_max_new_tokens)
            adapter = self._resolve(inp)
            label = adapter_label(adapter)
            prompt_ids = encode_prompt(self.engine.tokenizer, inp)
            handle = self.engine.submit(prompt_ids, inp.params, adapter=adapter)
        except (InvalidRequest, ValueError) as exc:
            if isinstance(exc, AdapterError):  # the folder exists (or every part of the mix does)
                self._abort(context, grpc.StatusCode.FAILED_PRECONDITION, f"adapter cannot be served: {exc}",
                            MIX_LABEL if mix else request.adapter_id)
            self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc), label)
        except AdapterNotFound as exc:
            self._abort(context, grpc.StatusCode.NOT_FOUND, exc.args[0], label)
        context.add_callback(handle.cancel)
        return handle

    def _abort(self, context, code: grpc.StatusCode, message: str, label: str):
        if self.metrics is not None:
            self.metrics.request_rejected(label, code.name)
        context.abort(code, message)

    def _resolve(self, inp: GenerateInput):
        if not inp.adapter_id and not inp.adapter_mix:
            return None
        if self.adapters is None:
            name = inp.adapter_id or inp.adapter_mix[0][0]
            raise AdapterNotFound(f"adapter {name!r} not found (this server has no adapters loaded)")
        try:
            if inp.adapter_mix:
                return self.adapters.resolve_mix(inp.adapter_mix)
            return self.adapters.resolve(inp.adapter_id)
        except KeyError as exc:
            raise AdapterNotFound(exc.args[0]) from None

    @staticmethod
    def _check(ev: Event, context) -> None:
        if ev.error is None:
            return
        context.abort(ERROR_CODES.get(ev.error_kind, grpc.StatusCode.INTERNAL), ev.error)

    # ---- RPCs ----
    def Generate(self, request, context):
        handle = self._start(request, context)
        ev = handle.result()
        self._check(ev, context)
        return pb.GenerateResponse(text=ev.text, token_ids=ev.token_ids, finish_reason=ev.finish_reason or "",
                                   prompt_tokens=ev.prompt_tokens, completion_tokens=ev.completion_tokens)

    def GenerateStream(self, request, context):
        handle = self._start(request, context)
        for ev in handle:
            self._check(ev, context)
            if ev.finish_reason is not None:
                yield pb.GenerateStreamResponse(finish_reason=ev.finish_reason, prompt_tokens=ev.prompt_tokens,
                                                completion_tokens=ev.completion_tokens)
            else:
                yield pb.GenerateStreamResponse(text=ev.text, token_ids=ev.token_ids)

    def _unimplemented(self, context, what: str):
        context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{what} is not available on this server yet")

    def UploadAdapter(self, request_iterator, context):
        self._unimplemented(context, "UploadAdapter")

    def ListAdapters(self, request, context):
        if self.adapters is None:
            return pb.ListAdaptersResponse()
        return pb.ListAdaptersResponse(adapters=[info_to_proto(i) for i in self.adapters.list()])

    def GetAdapter(self, request, context):
        if self.adapters is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"adapter {request.adapter_id!r} not found")
        try:
            return info_to_proto(self.adapters.info(request.adapter_id))
        except KeyError as exc:
            context.abort(grpc.StatusCode.NOT_FOUND, exc.args[0])
        except AdapterError as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))

    def DeleteAdapter(self, request, context):
        self._unimplemented(context, "DeleteAdapter")

    def Train(self, request, context):
        self._unimplemented(context, "Train")


def info_to_proto(info) -> pb.AdapterInfo:
    return pb.AdapterInfo(adapter_id=info.adapter_id, method=info.method, rank=info.rank,
                          target_modules=info.target_modules, base_model_name_or_path=info.base_model or "",
                          warnings=info.warnings, size_bytes=info.size_bytes)
