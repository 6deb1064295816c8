"""Registers a servicer's RPCs with a request decoder that never raises.

gRPC's own handlers answer an undecodable request with INTERNAL and log a traceback at ERROR; a
client's bad bytes are the client's mistake, so here they get INVALID_ARGUMENT and one warning line.
The handlers are built from the service's descriptor, so every method of the proto is covered.
"""
from __future__ import annotations

import logging
from typing import Callable

import grpc

log = logging.getLogger(__name__)


class Undecodable:
    """Stands in for a request whose bytes do not parse as its message type."""

    __slots__ = ("type_name", "size")

    def __init__(self, type_name: str, size: int):
        self.type_name, self.size = type_name, size


def _decoder(message_class) -> Callable[[bytes], object]:
    def decode(data: bytes):
        try:
            return message_class.FromString(data)
        except Exception:  # noqa: BLE001 (DecodeError, RecursionError on deep nesting, ...)
            return Undecodable(message_class.DESCRIPTOR.full_name, len(data))
    return decode


def _reject(method: str, request: Undecodable, context, on_reject) -> None:
    log.warning("%s: undecodable %s (%d bytes) from %s; answered INVALID_ARGUMENT", method, request.type_name,
                request.size, context.peer())
    if on_reject is not None:
        on_reject(method)
    context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request: not a valid {request.type_name} message")


def _guarded(method: str, behaviour, streaming: bool, on_reject):
    if streaming:
        def stream(request, context):
            if isinstance(request, Undecodable):
                _reject(method, request, context, on_reject)
            yield from behaviour(request, context)
        return stream

    def unary(request, context):
        if isinstance(request, Undecodable):
            _reject(method, request, context, on_reject)
        return behaviour(request, context)
    return unary


def add_service(server: grpc.Server, servicer, service, on_reject: Callable[[str], None] | None = None) -> None:
    """Register every unary-request method of `service` (a ServiceDescriptor) that `servicer` has.

    on_reject(method) is called for each undecodable request (metrics)."""
    from google.protobuf.message_factory import GetMessageClass as messages

    handlers = {}
    for m in service.methods:
        behaviour = getattr(servicer, m.name, None)
        if behaviour is None or m.client_streaming:
            continue
        kw = {"request_deserializer": _decoder(messages(m.input_type)),
              "response_serializer": messages(m.output_type).SerializeToString}
        guarded = _guarded(m.name, behaviour, m.server_streaming, on_reject)
        make = grpc.unary_stream_rpc_method_handler if m.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[m.name] = make(guarded, **kw)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)
