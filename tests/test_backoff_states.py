"""Backoff delays and the state machine's pure decisions."""

from __future__ import annotations

import random

import pytest

from supervisor.backoff import Backoff
from supervisor.errors import IllegalTransition
from supervisor.spec import BackoffSpec
from supervisor.states import (
    Decision,
    ExitStatus,
    Restart,
    ServiceState,
    after_exit,
    check_transition,
)


class TestBackoff:
    def test_doubles_from_initial_up_to_the_cap(self) -> None:
        """Without jitter the delays are initial * multiplier**n, capped at max (the seed: 1s -> 30s)."""
        backoff = Backoff(BackoffSpec(initial=1, max=30, multiplier=2, jitter=0))
        assert [backoff.next_delay() for _ in range(7)] == [1, 2, 4, 8, 16, 30, 30]

    def test_jitter_stays_within_the_fraction_and_under_the_cap(self) -> None:
        """Each delay is within +/- jitter of its base and never above max."""
        backoff = Backoff(
            BackoffSpec(initial=1, max=8, multiplier=2, jitter=0.2), rng=random.Random(7)
        )
        for base in [1, 2, 4, 8, 8, 8]:
            delay = backoff.next_delay()
            assert base * 0.8 <= delay <= min(base * 1.2, 8)

    def test_same_seed_same_sequence(self) -> None:
        """The random source is injected, so a seed reproduces the sequence."""
        spec = BackoffSpec(initial=0.5, max=10, jitter=0.5)
        a = Backoff(spec, rng=random.Random(1))
        b = Backoff(spec, rng=random.Random(1))
        assert [a.next_delay() for _ in range(5)] == [b.next_delay() for _ in range(5)]

    def test_reset_starts_again_at_initial(self) -> None:
        """reset() (after reset_after seconds of running) returns to the initial delay."""
        backoff = Backoff(BackoffSpec(initial=1, max=30, jitter=0))
        for _ in range(4):
            backoff.next_delay()
        backoff.reset()
        assert backoff.next_delay() == 1

    def test_zero_initial_means_no_delay(self) -> None:
        """initial = 0 restarts at once, every time."""
        backoff = Backoff(BackoffSpec(initial=0, max=30, jitter=0.5))
        assert [backoff.next_delay() for _ in range(3)] == [0, 0, 0]

    @pytest.mark.parametrize("multiplier", [1.5, 3.0, 10.0, 1e6])
    def test_huge_attempt_counts_do_not_overflow(self, multiplier: float) -> None:
        """Days of a crash loop stay at the cap instead of raising OverflowError."""
        backoff = Backoff(BackoffSpec(initial=1, max=30, multiplier=multiplier, jitter=0))
        backoff.attempt = 100_000
        assert backoff.next_delay() == 30

    def test_multiplier_one_is_a_constant_delay(self) -> None:
        """multiplier = 1: every delay is initial."""
        backoff = Backoff(BackoffSpec(initial=2, max=30, multiplier=1, jitter=0))
        assert [backoff.next_delay() for _ in range(3)] == [2, 2, 2]


class TestAfterExit:
    @pytest.mark.parametrize(
        ("policy", "code", "expected"),
        [
            (Restart.ALWAYS, 0, Decision.RESTART),
            (Restart.ALWAYS, 1, Decision.RESTART),
            (Restart.ON_FAILURE, 0, Decision.EXITED),
            (Restart.ON_FAILURE, 3, Decision.RESTART),
            (Restart.NO, 1, Decision.EXITED),
        ],
    )
    def test_policies(self, policy: Restart, code: int, expected: Decision) -> None:
        """always restarts, on-failure treats exit 0 as done, no never restarts."""
        got = after_exit(
            policy=policy,
            status=ExitStatus(code=code),
            failed_start=False,
            failed_starts_in_a_row=0,
            give_up_after=0,
        )
        assert got is expected

    def test_a_signal_is_a_failure_for_on_failure(self) -> None:
        """Killed by a signal is not a clean exit."""
        got = after_exit(
            policy=Restart.ON_FAILURE,
            status=ExitStatus(signal=9),
            failed_start=False,
            failed_starts_in_a_row=0,
            give_up_after=0,
        )
        assert got is Decision.RESTART

    def test_give_up_after_n_failed_starts(self) -> None:
        """The Nth failed start in a row is FATAL; 0 never gives up."""
        kwargs = dict(policy=Restart.ALWAYS, status=None, failed_start=True)
        assert after_exit(**kwargs, failed_starts_in_a_row=2, give_up_after=3) is Decision.RESTART  # type: ignore[arg-type]
        assert after_exit(**kwargs, failed_starts_in_a_row=3, give_up_after=3) is Decision.FATAL  # type: ignore[arg-type]
        assert after_exit(**kwargs, failed_starts_in_a_row=999, give_up_after=0) is Decision.RESTART  # type: ignore[arg-type]


class TestTransitions:
    def test_legal_move(self) -> None:
        """STARTING -> RUNNING is allowed."""
        check_transition("web", ServiceState.STARTING, ServiceState.RUNNING)

    def test_illegal_move_raises(self) -> None:
        """STOPPED -> RUNNING skips STARTING and raises IllegalTransition, not an assert."""
        with pytest.raises(
            IllegalTransition, match="web: illegal state transition stopped -> running"
        ):
            check_transition("web", ServiceState.STOPPED, ServiceState.RUNNING)


class TestExitStatus:
    def test_decodes_wait_status(self) -> None:
        """A waitpid status word decodes to a code or a signal, described for people."""
        assert ExitStatus.from_wait_status(3 << 8) == ExitStatus(code=3)
        assert ExitStatus.from_wait_status(9) == ExitStatus(signal=9)
        assert ExitStatus(signal=9).describe() == "signal SIGKILL"
        assert ExitStatus(code=1).as_json() == {"code": 1, "signal": None}
