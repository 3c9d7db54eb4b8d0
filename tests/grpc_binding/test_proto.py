"""The derived .proto: it compiles with protoc, matches the runtime descriptors, and
refuses models it cannot express."""

from __future__ import annotations

import datetime
import decimal
import importlib.util
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor_pb2  # type: ignore[import-untyped]
from pydantic import BaseModel
from typer.testing import CliRunner

from tests.grpc_binding.shop import PLACED_AT, Address, Line, Order, Priority, Status, svc
from wirework.cli.main import app
from wirework.errors import ConfigurationError
from wirework.grpc.codec import Codec
from wirework.grpc.descriptors import file_descriptor
from wirework.grpc.proto import derive, render_proto
from wirework.service import Service


def protoc(proto_dir: Path, out: Path, *extra: str) -> None:
    """Run grpc_tools' protoc on ``grpc_shop.proto``; fail with its own message."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{proto_dir}",
            *extra,
            str(proto_dir / "wirework" / "grpc_shop.proto"),
        ],
        capture_output=True,
        text=True,
        check=False,
        cwd=out,
    )
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """protoc's descriptor set and its Python module for the shop's emitted .proto."""
    root = tmp_path_factory.mktemp("proto")
    (root / "wirework").mkdir()
    (root / "wirework" / "grpc_shop.proto").write_text(render_proto(svc))
    out = root / "out"
    out.mkdir()
    protoc(root, out, f"--python_out={out}", f"--descriptor_set_out={out / 'set.pb'}")
    return out, descriptor_pb2.FileDescriptorSet.FromString((out / "set.pb").read_bytes())


@pytest.fixture(scope="module")
def generated(compiled: tuple[Path, Any]) -> Any:
    """protoc's Python module, loaded from its file (``wirework.*`` is our own package)."""
    out, _ = compiled
    path = out / "wirework" / "grpc_shop_pb2.py"
    spec = importlib.util.spec_from_file_location("generated_grpc_shop_pb2", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_emitted_proto_compiles_and_its_python_module_imports(generated: Any) -> None:
    service = generated.DESCRIPTOR.services_by_name["GrpcShop"]
    methods = {m.name: (m.client_streaming, m.server_streaming) for m in service.methods}
    assert methods == {
        "GetOrder": (False, False),
        "PlaceOrder": (False, False),
        "Watch": (False, True),
        "Upload": (True, False),
        "Chat": (True, True),
        "Cancel": (False, False),
        "Slow": (False, False),
        "Size": (False, False),
        "Flaky": (False, False),
        "FlakyPost": (False, False),
    }
    assert service.methods_by_name["Cancel"].output_type.full_name == "google.protobuf.Empty"


def test_protocs_descriptor_is_the_one_the_server_runs_on(compiled: tuple[Path, Any]) -> None:
    _, descriptor_set = compiled
    (from_protoc,) = [f for f in descriptor_set.file if f.name == "wirework/grpc_shop.proto"]

    assert file_descriptor(derive(svc)) == from_protoc


def test_bytes_from_protoc_generated_classes_decode_into_the_models(generated: Any) -> None:
    module = generated
    foreign = module.Order(
        id=str(uuid.UUID(int=9)),
        status=module.STATUS_OPEN,
        total="2.50",
        placed_at=PLACED_AT.isoformat(),
        priority=module.PRIORITY_HIGH,
    )
    foreign.lines.add(sku="kiwi", qty=4)
    foreign.by_sku["kiwi"].qty = 4
    foreign.by_sku["kiwi"].sku = "kiwi"

    order = Codec(derive(svc)).codec("Order").decode(foreign.SerializeToString())

    assert order == Order(
        id=uuid.UUID(int=9),
        status=Status.OPEN,
        lines=[Line(sku="kiwi", qty=4)],
        total=decimal.Decimal("2.50"),
        placed_at=PLACED_AT,
        priority=Priority.HIGH,
        by_sku={"kiwi": Line(sku="kiwi", qty=4)},
    )
    back = module.Order.FromString(Codec(derive(svc)).codec("Order").encode(order))
    foreign.channel = "grpc"  # our encoder writes every value, defaults included
    assert back == foreign


def test_field_numbers_follow_declaration_order_and_rpcs_say_where_they_stream() -> None:
    text = render_proto(svc)

    assert "  rpc Watch(WatchRequest) returns (stream OrderEvent);" in text
    assert "  rpc Upload(stream Line) returns (Summary);" in text
    assert "  rpc Chat(stream Line) returns (stream Line);" in text
    assert "  rpc Cancel(CancelRequest) returns (google.protobuf.Empty);" in text
    assert "message Address {\n  string street = 1;\n  string city = 2;\n}" in text
    assert "  Address ship_to = 6;\n  optional Priority priority = 7;" in text
    assert "  map<string, Line> by_sku = 10;" in text
    assert "enum Status {\n  STATUS_UNSPECIFIED = 0;\n  STATUS_OPEN = 1;" in text
    assert render_proto(svc) == text  # stable


def test_wirework_proto_prints_the_same_text() -> None:
    result = CliRunner().invoke(app, ["proto", "tests.grpc_binding.shop:svc"])

    assert result.exit_code == 0, result.output
    assert result.stdout == render_proto(svc)


def test_wirework_proto_names_a_bad_target_and_exits_2() -> None:
    result = CliRunner().invoke(app, ["proto", "tests.grpc_binding.shop:nope"])

    assert result.exit_code == 2
    assert "has no attribute 'nope'" in result.stderr


class Shipment(BaseModel):
    address: Address
    when: datetime.date


def one_endpoint(model: type[BaseModel]) -> Service:
    service = Service("bad-shapes")

    async def put_thing(thing: BaseModel) -> Shipment:
        raise NotImplementedError

    put_thing.__annotations__["thing"] = model  # annotations are strings in this module
    service.post("/v1/things")(put_thing)
    return service


class Nested(BaseModel):
    grid: list[list[int]]


class NullableList(BaseModel):
    items: list[int] | None = None


class AnyField(BaseModel):
    value: Any


class UnionField(BaseModel):
    value: int | str


class TupleKey(BaseModel):
    value: dict[float, int]


@pytest.mark.parametrize(
    ("model", "says"),
    [
        (Nested, "field 'grid' of model tests.grpc_binding.test_proto.Nested is list[int]"),
        (NullableList, "write `list[X] = []`"),
        (AnyField, "field 'value' of model tests.grpc_binding.test_proto.AnyField"),
        (UnionField, "int | str, which has no protobuf form"),
        (TupleKey, "a proto map key is str, int or bool"),
    ],
)
def test_a_type_without_protobuf_form_is_refused_naming_model_and_field(
    model: type[BaseModel], says: str
) -> None:
    with pytest.raises(ConfigurationError, match=says.replace("[", r"\[").replace("|", r"\|")):
        render_proto(one_endpoint(model))


def test_two_classes_with_one_name_are_refused() -> None:
    first = type("Thing", (BaseModel,), {"__annotations__": {"a": int}})
    second = type("Thing", (BaseModel,), {"__annotations__": {"b": int, "c": first}})

    with pytest.raises(ConfigurationError, match="would both be proto type 'Thing'"):
        render_proto(one_endpoint(second))


def test_a_service_without_grpc_endpoints_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="has no gRPC endpoints"):
        render_proto(Service("empty"))
