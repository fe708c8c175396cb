"""Generated protobuf and gRPC stubs of quiver.v1 (see quiver.server.protogen)."""
