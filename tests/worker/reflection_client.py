"""A client that knows nothing of the worker's generated code, as grpcurl: services, methods and
message types come from server reflection; requests go in and replies come out as JSON."""

from __future__ import annotations

import json
from typing import Any

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from google.protobuf.descriptor import Descriptor, MethodDescriptor
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase


class ReflectionClient:
    def __init__(self, channel: grpc.Channel) -> None:
        self.channel = channel
        self.database = ProtoReflectionDescriptorDatabase(channel)
        # A pool of its own: nothing from the process's default pool (where worker.pb lives) is used.
        self.pool = descriptor_pool.DescriptorPool(self.database)

    def services(self) -> list[str]:
        return sorted(self.database.get_services())

    def method(self, full_method: str) -> MethodDescriptor:
        """`package.Service/Method` (grpcurl's spelling; a dot before the method works too)."""
        service, _, name = full_method.replace("/", ".").rpartition(".")
        return self.pool.FindServiceByName(service).methods_by_name[name]

    def message_class(self, descriptor: Descriptor) -> type:
        return message_factory.GetMessageClass(descriptor)

    def call(self, full_method: str, body: str = "{}", timeout: float = 30) -> dict[str, Any]:
        """A unary call with a JSON request; the reply as grpcurl prints it (camelCase names, 64-bit
        integers as strings, enum names, default values left out), parsed back into a dict."""
        method = self.method(full_method)
        request_cls = self.message_class(method.input_type)
        response_cls = self.message_class(method.output_type)
        request = json_format.Parse(body, request_cls())
        stub = self.channel.unary_unary(
            f"/{method.containing_service.full_name}/{method.name}",
            request_serializer=request_cls.SerializeToString,
            response_deserializer=response_cls.FromString,
        )
        reply = stub(request, timeout=timeout)
        return json.loads(json_format.MessageToJson(reply, indent=None))
