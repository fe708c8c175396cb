"""The committed gRPC stubs match proto/quiver/v1/quiver.proto, and the contract's field names hold."""

from pathlib import Path

from quiver.server import protogen
from quiver.server.pb import quiver_pb2 as pb


def test_generated_stubs_are_up_to_date():
    for name, text in protogen.generate().items():
        committed = (protogen.OUT_DIR / name).read_text()
        assert committed == text, f"{name} is stale: run python -m quiver.server.protogen"


def test_contract_field_names():
    req = {f.name for f in pb.GenerateRequest.DESCRIPTOR.fields}
    assert {"adapter_id", "prompt", "messages", "max_new_tokens", "temperature", "top_p", "top_k", "seed",
            "stop"} <= req
    resp = {f.name for f in pb.GenerateResponse.DESCRIPTOR.fields}
    assert {"text", "token_ids", "finish_reason", "prompt_tokens", "completion_tokens"} <= resp
    rpcs = {m.name for m in pb.DESCRIPTOR.services_by_name["Quiver"].methods}
    assert rpcs == {"Generate", "GenerateStream", "UploadAdapter", "ListAdapters", "GetAdapter", "DeleteAdapter",
                    "Train"}
    assert Path(protogen.PROTO_ROOT / protogen.PROTO_FILE).is_file()
