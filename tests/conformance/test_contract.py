"""The broker contract, checked on every backend (``wirework.testing.conformance``).

One test per check, each parametrised over the backends of ``conftest.py``;
the checks' docstrings say what each proves.
"""

from __future__ import annotations

import sys

from wirework.testing import conformance
from wirework.testing.conformance import ConformanceTarget


async def test_fan_out_to_every_group(target: ConformanceTarget) -> None:
    await conformance.check_fan_out_to_every_group(target)


async def test_competing_consumers_share_a_group(target: ConformanceTarget) -> None:
    await conformance.check_competing_consumers_share_a_group(target)


async def test_publish_is_durable(target: ConformanceTarget) -> None:
    proved = await conformance.check_publish_is_durable(target)
    print(f"{target.name}: {proved}")


async def test_ack_removes_the_message(target: ConformanceTarget) -> None:
    await conformance.check_ack_removes_the_message(target)


async def test_start_ack_is_an_ack_begun(target: ConformanceTarget) -> None:
    await conformance.check_start_ack_is_an_ack_begun(target)


async def test_failures_keep_attempts_and_times(target: ConformanceTarget) -> None:
    await conformance.check_failures_keep_attempts_and_times(target)


async def test_dead_letters_list_filter_and_get(target: ConformanceTarget) -> None:
    await conformance.check_dead_letters_list_filter_and_get(target)


async def test_replay_returns_to_the_original_group_only(target: ConformanceTarget) -> None:
    await conformance.check_replay_returns_to_the_original_group_only(target)


async def test_lease_expiry_redelivers_to_another_consumer(target: ConformanceTarget) -> None:
    await conformance.check_lease_expiry_redelivers_to_another_consumer(target)


async def test_leaving_a_subscription_hands_deliveries_back(target: ConformanceTarget) -> None:
    await conformance.check_leaving_a_subscription_hands_deliveries_back(target)


async def test_undecodable_bytes_arrive_unchanged(target: ConformanceTarget) -> None:
    await conformance.check_undecodable_bytes_arrive_unchanged(target)


async def test_key_order_with_competing_consumers(target: ConformanceTarget) -> None:
    await conformance.check_key_order_with_competing_consumers(target)


async def test_no_head_of_line_blocking_across_keys(target: ConformanceTarget) -> None:
    await conformance.check_no_head_of_line_blocking_across_keys(target)


async def test_delayed_delivery(target: ConformanceTarget) -> None:
    await conformance.check_delayed_delivery(target)


async def test_prefetch_bounds_a_subscription(target: ConformanceTarget) -> None:
    await conformance.check_prefetch_bounds_a_subscription(target)


async def test_start_position_earliest_and_latest(target: ConformanceTarget) -> None:
    await conformance.check_start_position_earliest_and_latest(target)


async def test_nothing_is_kept_after_every_group_acks(target: ConformanceTarget) -> None:
    await conformance.check_nothing_is_kept_after_every_group_acks(target)


async def test_oversized_publish_is_refused(target: ConformanceTarget) -> None:
    await conformance.check_oversized_publish_is_refused(target)


async def test_invalid_topic_name_is_refused(target: ConformanceTarget) -> None:
    await conformance.check_invalid_topic_name_is_refused(target)


async def test_settling_twice_raises(target: ConformanceTarget) -> None:
    await conformance.check_settling_twice_raises(target)


async def test_closed_broker_ends_subscriptions_and_refuses_calls(
    target: ConformanceTarget,
) -> None:
    await conformance.check_closed_broker_ends_subscriptions_and_refuses_calls(target)


async def test_handler_errors_retry_then_dead_letter(target: ConformanceTarget) -> None:
    await conformance.check_handler_errors_retry_then_dead_letter(target)


async def test_transient_failures_then_success(target: ConformanceTarget) -> None:
    await conformance.check_transient_failures_then_success(target)


async def test_malformed_payloads_dead_letter_at_once(target: ConformanceTarget) -> None:
    await conformance.check_malformed_payloads_dead_letter_at_once(target)


async def test_schema_violations_dead_letter_with_field(target: ConformanceTarget) -> None:
    await conformance.check_schema_violations_dead_letter_with_field(target)


async def test_unknown_type_dead_letters(target: ConformanceTarget) -> None:
    await conformance.check_unknown_type_dead_letters(target)


async def test_reject_dead_letters_at_once(target: ConformanceTarget) -> None:
    await conformance.check_reject_dead_letters_at_once(target)


async def test_oversized_delivery_dead_letters(target: ConformanceTarget) -> None:
    await conformance.check_oversized_delivery_dead_letters(target)


def test_every_check_has_a_test() -> None:
    """A check added to ALL_CHECKS without a test here would silently never run."""
    module = sys.modules[__name__]
    missing = [
        check.__name__
        for check in conformance.ALL_CHECKS
        if not hasattr(module, "test_" + check.__name__.removeprefix("check_"))
    ]
    assert not missing


async def test_declare_and_delete_groups(target: ConformanceTarget) -> None:
    await conformance.check_declare_and_delete_groups(target)
