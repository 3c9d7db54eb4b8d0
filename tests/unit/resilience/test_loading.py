"""Policy files: good ones load, bad ones say which file, line and field is wrong."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from wirework.errors import ConfigurationError
from wirework.resilience import (
    CircuitBreakerSettings,
    PolicySet,
    RetrySettings,
    TargetPolicies,
    load_policies,
)

DOC = Path(__file__).parents[3] / "docs" / "resilience.md"


def doc_block(language: str, index: int = 0) -> str:
    """The ``index``-th fenced block of ``language`` in docs/resilience.md."""
    blocks = re.findall(rf"```{language}\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    return str(blocks[index])


def test_the_documented_example_file_loads(tmp_path: Path) -> None:
    """The example in docs/resilience.md is a valid policy file, with the values it shows."""
    path = tmp_path / "policies.yaml"
    path.write_text(doc_block("yaml"), encoding="utf-8")

    policies = load_policies(path)

    assert policies.targets() == ["payments", "stock"]
    payments = policies["payments"]
    assert payments.timeout == 2.0
    assert payments.retry is not None
    assert payments.retry.per_try_timeout == 0.5
    assert payments.retry.budget.min_per_second == 10
    assert payments.circuit_breaker is not None
    assert payments.circuit_breaker.consecutive_failures == 5
    assert payments.bulkhead is not None
    assert payments.bulkhead.max_queued == 20
    assert policies["stock"] == TargetPolicies(timeout=0.5, retry=RetrySettings())
    assert load_policies(str(path)) == policies


def test_the_documented_error_messages_are_the_real_ones(tmp_path: Path) -> None:
    """Breaking the example as the docs describe gives exactly the messages the docs show."""
    broken = (
        doc_block("yaml")
        .replace("max_attempts: 3 ", "max_attempts: 0 ")
        .replace("cooldown: 5 ", "cooldwn: 5  ")
    )
    path = tmp_path / "policies.yaml"
    path.write_text(broken, encoding="utf-8")

    with pytest.raises(ConfigurationError) as caught:
        load_policies(path)

    expected = doc_block("text").strip().replace("policies.yaml", str(path))
    assert str(caught.value) == expected


def test_text_and_defaults() -> None:
    """YAML given as text loads; an absent policy is None, an empty one has the defaults."""
    policies = load_policies("orders:\n  circuit_breaker: {}\n")

    assert policies["orders"].timeout == 10.0
    assert policies["orders"].retry is None
    assert policies["orders"].circuit_breaker == CircuitBreakerSettings()
    assert load_policies("") == PolicySet({})
    assert "orders" in policies


def test_merge_keys_share_defaults() -> None:
    """YAML anchors and merge keys work, and are not taken for keys written twice."""
    policies = load_policies(
        "defaults: &defaults\n"
        "  timeout: 3\n"
        "  retry: {max_attempts: 2}\n"
        "orders:\n"
        "  <<: *defaults\n"
        "  timeout: 1\n"
    )

    assert policies["orders"].timeout == 1.0
    assert policies["orders"].retry == RetrySettings(max_attempts=2)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "payments:\n  retry:\n    max_attempts: '3'\n",
            "<policies>:3: payments.retry.max_attempts: Input should be a valid integer (got '3')",
        ),
        (
            "payments:\n  bulkhead:\n    max_concurrent: true\n",
            "<policies>:3: payments.bulkhead.max_concurrent: Input should be a valid integer "
            "(got True)",
        ),
        (
            "payments:\n  timout: 2\n",
            "<policies>:2: payments.timout: unknown field 'timout'; the fields here are: "
            "timeout, retry, circuit_breaker, bulkhead",
        ),
        (
            "payments:\n  retry:\n    budget: {ratio: 0.2, windw: 5}\n",
            "<policies>:3: payments.retry.budget.windw: unknown field 'windw'; the fields "
            "here are: ratio, min_per_second, window",
        ),
        (
            "payments:\n  timeout: 0\n",
            "<policies>:2: payments.timeout: Input should be greater than 0 (got 0)",
        ),
        (
            "payments:\n  timeout: .inf\n",
            "<policies>:2: payments.timeout: Input should be a finite number (got inf)",
        ),
        (
            "payments:\n  circuit_breaker:\n    minimum_calls: 30\n",
            "<policies>:2: payments.circuit_breaker: Value error, minimum_calls (30) is larger "
            "than window_size (20), so the failure rate could never trip the breaker",
        ),
        (
            "pay ments:\n  timeout: 2\n",
            "<policies>:1: pay ments: 'pay ments' is not a valid target name (letters, "
            "digits, '_', '.', '-', starting with a letter or digit)",
        ),
        ("payments: 5\n", "<policies>:1: payments: Input should be a valid dictionary"),
        (
            "payments:\n  timeout: 2\n  retry: {}\n  timeout: 3\n",
            "<policies>:4: payments.timeout: written twice (first at line 2); YAML would keep "
            "only this one, so remove one",
        ),
        (
            "- payments\n",
            "<policies>:1: the top level must map target names to their policies "
            "(e.g. `payments:` then `timeout: 2`), not a list",
        ),
        ("payments:\n  retry: [\n", "<policies>:3: not valid YAML: "),
    ],
)
def test_bad_policies_name_the_line_and_the_field(text: str, expected: str) -> None:
    """Each mistake is reported with its line and dotted field, and what to write instead."""
    with pytest.raises(ConfigurationError) as caught:
        load_policies(text)

    assert str(caught.value).startswith(expected)


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    """A path that does not exist is reported as such, not parsed as YAML text."""
    missing = tmp_path / "nope.yaml"
    for source in (missing, str(missing)):
        with pytest.raises(ConfigurationError, match=r"nope\.yaml: no such policy file"):
            load_policies(source)


def test_every_error_in_a_file_is_reported_at_once(tmp_path: Path) -> None:
    """Two mistakes, two lines in the message, each with the file's path."""
    path = tmp_path / "two.yml"
    path.write_text("a:\n  timeout: -1\nb:\n  bulkhead: {max_queued: -1}\n", encoding="utf-8")

    with pytest.raises(ConfigurationError) as caught:
        load_policies(path)

    lines = str(caught.value).splitlines()
    assert [line.split(": ")[0] for line in lines] == [f"{path}:2", f"{path}:4"]


async def test_the_documented_code_example_runs() -> None:
    """The Python block in docs/resilience.md runs as written, against a stand-in charge()."""
    body = "\n".join(f"    {line}" for line in doc_block("python").splitlines())
    source = f"async def example(charge, order):\n{body}\n    return receipt\n"
    namespace: dict[str, object] = {}
    exec(compile(source, str(DOC), "exec"), namespace)

    class Order:
        id = "order-17"

    async def charge(order: Order) -> str:
        return f"receipt for {order.id}"

    example = namespace["example"]
    assert callable(example)
    assert await example(charge, Order()) == "receipt for order-17"
