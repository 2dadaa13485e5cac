"""`run_each`: one failing input becomes one line and the others still run."""

from __future__ import annotations

import pytest

from ips.errors import ConfigError, Failure, failure_summary, one_line, run_each


def _work(x: int) -> int:
    if x == 2:
        raise ValueError("two is bad\nsecond line")
    if x == 3:
        raise ConfigError("key 'a' is wrong")
    return x * 10


def test_run_each_keeps_going_and_names_each_failure():
    logged: list[str] = []
    done, failures = run_each(
        [1, 2, 3, 4], _work, name=lambda x: f"s{x}", path=lambda x: f"/p/{x}", log=logged.append
    )
    assert done == [(1, 10), (4, 40)]
    assert failures == [
        Failure("s2", "/p/2", "ValueError: two is bad"),
        Failure("s3", "/p/3", "key 'a' is wrong"),
    ]
    assert logged == ["[2/4] s2: FAILED: ValueError: two is bad", "[3/4] s3: FAILED: key 'a' is wrong"]
    assert failure_summary("predict", failures, 4)[-1] == "ips predict: 2 of 4 inputs failed"
    assert failure_summary("predict", [], 4) == []


def test_run_each_does_not_swallow_interrupts():
    def stop(x: int) -> int:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_each([1], stop)


def test_one_line_of_an_empty_message():
    assert one_line(RuntimeError()) == "RuntimeError: "
