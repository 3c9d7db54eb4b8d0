"""The broker conformance suite, as plain async functions any backend can run.

Every shipped backend runs these checks (``tests/conformance``); a
third-party backend proves it keeps the contract of
``wirework.brokers.base`` by running them too::

    import pytest
    from wirework.testing import conformance

    @pytest.fixture
    async def target(tmp_path):
        target = conformance.UrlTarget(f"mybroker://{tmp_path}/store")
        yield target
        await target.aclose()

    @pytest.mark.parametrize("check", conformance.ALL_CHECKS, ids=lambda c: c.__name__)
    async def test_conformance(target, check):
        await check(target)

Each check takes a fresh ``ConformanceTarget`` (an empty store), states its
intent in its docstring, and fails with ``AssertionError``. They run in real
time with short leases (0.5 s) and backoff (50 ms) and wait for conditions
with deadlines, so a passing check takes about as long as what it checks.

Which contract point each check covers (numbers as in ``base.py``):

1. fan-out and competing consumers: ``check_fan_out_to_every_group``,
   ``check_competing_consumers_share_a_group``
2. durable publish: ``check_publish_is_durable``
3. ack, nack, dead letters: ``check_ack_removes_the_message``,
   ``check_start_ack_is_an_ack_begun``,
   ``check_failures_keep_attempts_and_times``,
   ``check_dead_letters_list_filter_and_get``,
   ``check_replay_returns_to_the_original_group_only``, and through the
   consumer ``check_handler_errors_retry_then_dead_letter``,
   ``check_transient_failures_then_success``, ``check_reject_dead_letters_at_once``
4. leases: ``check_lease_expiry_redelivers_to_another_consumer``,
   ``check_leaving_a_subscription_hands_deliveries_back``
5. raw bytes: ``check_undecodable_bytes_arrive_unchanged``, and through the
   consumer ``check_malformed_payloads_dead_letter_at_once``,
   ``check_schema_violations_dead_letter_with_field``,
   ``check_unknown_type_dead_letters``, ``check_oversized_delivery_dead_letters``
6. per-key order: ``check_key_order_with_competing_consumers``,
   ``check_no_head_of_line_blocking_across_keys``
7. delays: ``check_delayed_delivery``
8. prefetch: ``check_prefetch_bounds_a_subscription``

and, for every backend alike: ``check_start_position_earliest_and_latest``,
``check_nothing_is_kept_after_every_group_acks``,
``check_oversized_publish_is_refused``, ``check_invalid_topic_name_is_refused``,
``check_settling_twice_raises``,
``check_closed_broker_ends_subscriptions_and_refuses_calls``; and the
optional capability every shipped backend has, ``GroupAdmin``:
``check_declare_and_delete_groups``.

Three behaviours the suite fixes where the contract leaves room:

* a *stale* settle (from a delivery whose lease ran out and whose message went
  to another consumer, or whose subscription was left) has no effect on the
  message; it may return (memory, SQLite) or raise a ``BrokerError`` (a
  network backend that finds the delivery gone);
* leaving a subscription also hands back what the backend fetched for it but
  never yielded;
* a message acked (or dead-lettered) by every group is gone, so a group
  created later with ``start="earliest"`` does not see it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from wirework.testing.conformance.admin import check_declare_and_delete_groups
from wirework.testing.conformance.consuming import (
    check_handler_errors_retry_then_dead_letter,
    check_malformed_payloads_dead_letter_at_once,
    check_oversized_delivery_dead_letters,
    check_reject_dead_letters_at_once,
    check_schema_violations_dead_letter_with_field,
    check_transient_failures_then_success,
    check_unknown_type_dead_letters,
)
from wirework.testing.conformance.contract import (
    check_ack_removes_the_message,
    check_closed_broker_ends_subscriptions_and_refuses_calls,
    check_competing_consumers_share_a_group,
    check_dead_letters_list_filter_and_get,
    check_delayed_delivery,
    check_failures_keep_attempts_and_times,
    check_fan_out_to_every_group,
    check_invalid_topic_name_is_refused,
    check_key_order_with_competing_consumers,
    check_lease_expiry_redelivers_to_another_consumer,
    check_leaving_a_subscription_hands_deliveries_back,
    check_no_head_of_line_blocking_across_keys,
    check_nothing_is_kept_after_every_group_acks,
    check_oversized_publish_is_refused,
    check_prefetch_bounds_a_subscription,
    check_publish_is_durable,
    check_replay_returns_to_the_original_group_only,
    check_settling_twice_raises,
    check_start_ack_is_an_ack_begun,
    check_start_position_earliest_and_latest,
    check_undecodable_bytes_arrive_unchanged,
)
from wirework.testing.conformance.support import wait_until
from wirework.testing.conformance.target import ConformanceTarget, InstanceTarget, UrlTarget

Check = Callable[[ConformanceTarget], Awaitable[object]]

#: Every check, in the order of the contract points they cover.
ALL_CHECKS: tuple[Check, ...] = (
    check_fan_out_to_every_group,
    check_competing_consumers_share_a_group,
    check_publish_is_durable,
    check_ack_removes_the_message,
    check_start_ack_is_an_ack_begun,
    check_failures_keep_attempts_and_times,
    check_dead_letters_list_filter_and_get,
    check_replay_returns_to_the_original_group_only,
    check_lease_expiry_redelivers_to_another_consumer,
    check_leaving_a_subscription_hands_deliveries_back,
    check_undecodable_bytes_arrive_unchanged,
    check_key_order_with_competing_consumers,
    check_no_head_of_line_blocking_across_keys,
    check_delayed_delivery,
    check_prefetch_bounds_a_subscription,
    check_start_position_earliest_and_latest,
    check_nothing_is_kept_after_every_group_acks,
    check_oversized_publish_is_refused,
    check_invalid_topic_name_is_refused,
    check_settling_twice_raises,
    check_closed_broker_ends_subscriptions_and_refuses_calls,
    check_handler_errors_retry_then_dead_letter,
    check_transient_failures_then_success,
    check_malformed_payloads_dead_letter_at_once,
    check_schema_violations_dead_letter_with_field,
    check_unknown_type_dead_letters,
    check_reject_dead_letters_at_once,
    check_oversized_delivery_dead_letters,
    check_declare_and_delete_groups,
)

__all__ = [
    "ALL_CHECKS",
    "Check",
    "ConformanceTarget",
    "InstanceTarget",
    "UrlTarget",
    "check_ack_removes_the_message",
    "check_closed_broker_ends_subscriptions_and_refuses_calls",
    "check_competing_consumers_share_a_group",
    "check_dead_letters_list_filter_and_get",
    "check_declare_and_delete_groups",
    "check_delayed_delivery",
    "check_failures_keep_attempts_and_times",
    "check_fan_out_to_every_group",
    "check_handler_errors_retry_then_dead_letter",
    "check_invalid_topic_name_is_refused",
    "check_key_order_with_competing_consumers",
    "check_lease_expiry_redelivers_to_another_consumer",
    "check_leaving_a_subscription_hands_deliveries_back",
    "check_malformed_payloads_dead_letter_at_once",
    "check_no_head_of_line_blocking_across_keys",
    "check_nothing_is_kept_after_every_group_acks",
    "check_oversized_delivery_dead_letters",
    "check_oversized_publish_is_refused",
    "check_prefetch_bounds_a_subscription",
    "check_publish_is_durable",
    "check_reject_dead_letters_at_once",
    "check_replay_returns_to_the_original_group_only",
    "check_schema_violations_dead_letter_with_field",
    "check_settling_twice_raises",
    "check_start_ack_is_an_ack_begun",
    "check_start_position_earliest_and_latest",
    "check_transient_failures_then_success",
    "check_undecodable_bytes_arrive_unchanged",
    "check_unknown_type_dead_letters",
    "wait_until",
]
