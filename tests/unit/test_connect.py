"""A bad broker URL or option fails at once, saying what to write instead."""

from __future__ import annotations

from pathlib import Path

import pytest

from wirework.brokers import connect
from wirework.errors import ConfigurationError


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("shop.db", "has no scheme"),
        ("kafka://localhost:9092", "unknown broker scheme 'kafka'"),
        ("sqlite://host/x.db", "has a host"),
        ("sqlite:///", "names no file"),
        ("sqlite:///no/such/dir/x.db", "does not exist"),
    ],
)
def test_bad_urls_name_the_fix(url: str, expected: str) -> None:
    """Each malformed URL raises ConfigurationError whose message names the problem."""
    with pytest.raises(ConfigurationError, match=expected) as info:
        connect(url)
    assert "sqlite:///" in str(info.value) or "create" in str(info.value)


def test_misspelt_option_suggests_the_right_one(tmp_path: Path) -> None:
    """A typo in an option is caught before anything opens, with the closest valid name."""
    with pytest.raises(ConfigurationError, match="did you mean 'durability'"):
        connect(f"sqlite:///{tmp_path}/b.db?durabilty=fast")


def test_invalid_option_value_is_named(tmp_path: Path) -> None:
    """An out-of-range value names the option and the value."""
    with pytest.raises(ConfigurationError, match="durability"):
        connect(f"sqlite:///{tmp_path}/b.db?durability=sometimes")
    with pytest.raises(ConfigurationError, match="busy_timeout"):
        connect(f"sqlite:///{tmp_path}/b.db", busy_timeout=-1)


def test_options_reach_the_backend(tmp_path: Path) -> None:
    """Query-string and keyword options both configure the backend."""
    broker = connect(f"sqlite:///{tmp_path}/b.db?durability=fast", max_message_bytes=2048)
    assert broker.max_message_bytes == 2048
    assert broker.settings.durability == "fast"  # type: ignore[attr-defined]


async def test_not_a_broker_file_is_a_clear_error(tmp_path: Path) -> None:
    """Pointing the URL at a file that is not SQLite fails on first use with a clear error."""
    path = tmp_path / "notes.txt"
    path.write_text("this is not a database, but it is long enough to be read " * 20)
    async with connect(f"sqlite:///{path}") as broker:
        with pytest.raises(ConfigurationError, match="not a usable wirework SQLite broker file"):
            await broker.stats()  # type: ignore[attr-defined]
