"""CPU slots: never more holders than slots, a waiting insert before a waiting step."""

from __future__ import annotations

import threading
import time

import pytest

from export_pipeline.core.slots import CpuSlots


def _wait_until(condition: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            pytest.fail("timed out waiting for the slots")
        time.sleep(0.005)


def test_holders_never_exceed_the_slots_and_wait_for_a_free_one() -> None:
    slots = CpuSlots(2)
    running = 0
    most = 0
    lock = threading.Lock()

    def work() -> None:
        nonlocal running, most
        with slots.hold():
            with lock:
                running += 1
                most = max(most, running)
            time.sleep(0.02)
            with lock:
                running -= 1

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert most == 2


def test_a_waiting_urgent_holder_goes_before_a_waiting_one() -> None:
    slots = CpuSlots(1)
    order: list[str] = []
    release = threading.Event()

    def first() -> None:
        with slots.hold():
            release.wait(10)

    def waiter(name: str, urgent: bool) -> None:
        with slots.hold(urgent=urgent):
            order.append(name)

    holder = threading.Thread(target=first)
    holder.start()
    _wait_until(lambda: slots._busy == 1)
    step = threading.Thread(target=waiter, args=("step", False))
    step.start()
    _wait_until(lambda: slots._waiting == 1)
    insert = threading.Thread(target=waiter, args=("insert", True))
    insert.start()
    _wait_until(lambda: slots._waiting == 2)
    release.set()
    for t in (holder, step, insert):
        t.join(timeout=10)
    assert order == ["insert", "step"]


def test_lifting_the_limit_lets_every_waiter_in() -> None:
    slots = CpuSlots(1)
    inside = threading.Barrier(3, timeout=10)
    held = threading.Event()

    def first() -> None:
        with slots.hold():
            held.set()
            inside.wait()  # only passes when both others are inside too

    def other() -> None:
        with slots.hold():
            inside.wait()

    threads = [threading.Thread(target=first), threading.Thread(target=other)]
    threads[0].start()
    held.wait(10)
    threads[1].start()
    _wait_until(lambda: slots._waiting == 1)
    slots.limit(None)
    inside.wait()
    for t in threads:
        t.join(timeout=10)
    assert slots._busy == 0
