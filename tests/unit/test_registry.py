"""The service registry: parsing, round-robin, and clear errors for malformed input."""

from __future__ import annotations

from pathlib import Path

import pytest

from wirework.errors import ConfigurationError
from wirework.registry import Registry

INLINE = "orders=http://127.0.0.1:8000,grpc://127.0.0.1:50051;payments=grpc://10.0.0.2:50051"


def test_inline_form_splits_services_and_schemes() -> None:
    registry = Registry.from_env({"WIREWORK_REGISTRY": INLINE})
    assert registry.addresses("orders", "http") == ("http://127.0.0.1:8000",)
    assert registry.addresses("orders", "grpc") == ("grpc://127.0.0.1:50051",)
    assert registry.addresses("payments", "grpc") == ("grpc://10.0.0.2:50051",)
    assert registry.addresses("payments", "http") == ()
    assert registry.services() == {
        "orders": ("http://127.0.0.1:8000", "grpc://127.0.0.1:50051"),
        "payments": ("grpc://10.0.0.2:50051",),
    }


def test_next_turns_round_robin_per_service_and_scheme() -> None:
    registry = Registry(
        {"orders": ["http://a:1", "http://b:2/", "grpc://c:3", "http://a:1"]}, source="test"
    )
    assert [registry.next("orders", "http") for _ in range(5)] == [
        "http://a:1",
        "http://b:2",
        "http://a:1",
        "http://b:2",
        "http://a:1",
    ]
    assert registry.next("orders", "grpc") == "grpc://c:3"
    assert registry.next("orders", ("https", "http")) == "http://b:2"


def test_file_form_reads_yaml_and_json(tmp_path: Path) -> None:
    yaml_file = tmp_path / "registry.yaml"
    yaml_file.write_text(
        "services:\n  orders:\n    - http://127.0.0.1:8000\n    - http://127.0.0.1:8001\n"
    )
    json_file = tmp_path / "registry.json"
    json_file.write_text('{"services": {"payments": ["grpcs://pay.internal:443"]}}')
    from_yaml = Registry.from_env({"WIREWORK_REGISTRY_FILE": str(yaml_file)})
    assert from_yaml.addresses("orders", "http") == (
        "http://127.0.0.1:8000",
        "http://127.0.0.1:8001",
    )
    from_json = Registry.from_env({"WIREWORK_REGISTRY_FILE": str(json_file)})
    assert from_json.next("payments", "grpcs") == "grpcs://pay.internal:443"


def test_an_empty_environment_gives_an_empty_registry_that_names_both_variables() -> None:
    registry = Registry.from_env({})
    with pytest.raises(ConfigurationError) as caught:
        registry.next("orders", "http")
    message = str(caught.value)
    assert "'orders'" in message
    assert "WIREWORK_REGISTRY" in message
    assert "WIREWORK_REGISTRY_FILE" in message


def test_a_missing_scheme_says_what_the_service_has() -> None:
    registry = Registry.parse("payments=grpc://10.0.0.2:50051")
    with pytest.raises(
        ConfigurationError, match=r"no http address for service 'payments'.*grpc://10\.0\.0\.2"
    ):
        registry.next("payments", "http")


@pytest.mark.parametrize(
    ("value", "names"),
    [
        ("orders", "'orders'"),
        ("=http://a:1", "'=http://a:1'"),
        ("orders=ftp://a:1", "'ftp://a:1'"),
        ("orders=http://", "'http://'"),
        ("orders=http://a:99999", "'http://a:99999'"),
        ("orders=http://user:secret@a:1", "credentials"),
        ("orders=http://a:1?x=1", "'http://a:1?x=1'"),
        ("orders=grpc://a", "needs a port"),
        ("orders=grpc://a:1/path", "no path"),
        ("orders=http://a:1;orders=http://b:1", "appears twice"),
        ("orders=", "non-empty list"),
        ("or ders=http://a:1", "'or ders'"),
    ],
)
def test_malformed_inline_entries_name_the_variable_and_the_entry(value: str, names: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        Registry.from_env({"WIREWORK_REGISTRY": value})
    assert "WIREWORK_REGISTRY" in str(caught.value)
    assert names in str(caught.value)


@pytest.mark.parametrize(
    ("content", "names"),
    [
        ("services: [", "not valid YAML"),
        ("orders: [http://a:1]", "`services` mapping"),
        ("services:\n  orders: http://a:1\n", "non-empty list"),
        ("services:\n  orders: [42]\n", "non-text URL 42"),
    ],
)
def test_malformed_files_name_the_file(tmp_path: Path, content: str, names: str) -> None:
    path = tmp_path / "registry.yaml"
    path.write_text(content)
    with pytest.raises(ConfigurationError) as caught:
        Registry.from_env({"WIREWORK_REGISTRY_FILE": str(path)})
    assert str(path) in str(caught.value)
    assert names in str(caught.value)


def test_a_missing_file_and_both_variables_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="cannot be read"):
        Registry.from_env({"WIREWORK_REGISTRY_FILE": str(tmp_path / "absent.yaml")})
    with pytest.raises(ConfigurationError, match="set one of them"):
        Registry.from_env({"WIREWORK_REGISTRY": INLINE, "WIREWORK_REGISTRY_FILE": "x.yaml"})
