"""The status ledger bridges the gap between a status write and the watch event that shows it."""

from __future__ import annotations

from kquant.operator import ledger


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _body(version: str, phase: str) -> dict[str, object]:
    return {"metadata": {"uid": "u1", "resourceVersion": version}, "status": {"phase": phase}}


def test_a_pass_before_the_watch_catches_up_sees_what_was_written() -> None:
    book = ledger.StatusLedger()
    book.wrote("u1", ledger.Written("12", {"phase": "Downloading"}))
    stale = _body("10", "Pending")
    assert book.newest(stale)["status"] == {"phase": "Downloading"}
    assert book.newest(stale)["metadata"] == stale["metadata"], "only the status is replaced"


def test_once_the_watch_shows_the_write_the_index_is_trusted_again() -> None:
    book = ledger.StatusLedger()
    book.wrote("u1", ledger.Written("12", {"phase": "Downloading"}))
    book.seen("u1", "11")  # an older event: the write is still ahead of the index
    assert book.newest(_body("11", "Pending"))["status"] == {"phase": "Downloading"}
    book.seen("u1", "12")
    newer = _body("13", "Quantizing")  # someone else's write after ours
    assert book.newest(newer) is newer


def test_an_unconfirmed_write_expires_and_other_models_are_untouched() -> None:
    clock = Clock()
    book = ledger.StatusLedger(max_age=60, clock=clock)
    book.wrote("u1", ledger.Written("12", {"phase": "Downloading"}))
    other = {"metadata": {"uid": "u2", "resourceVersion": "3"}, "status": {"phase": "Ready"}}
    assert book.newest(other) is other
    clock.now = 61
    body = _body("10", "Pending")
    assert book.newest(body) is body
    book.wrote("u1", ledger.Written("14", {"phase": "Ready"}))
    book.forget("u1")
    assert book.newest(body) is body


def test_a_write_recorded_after_its_model_was_forgotten_does_not_stay_for_ever() -> None:
    """A pass that wrote just before its model's deletion records its write after the DELETED
    event forgot the model: the entry is never read again, and the next write sweeps it."""
    clock = Clock()
    book = ledger.StatusLedger(max_age=60, clock=clock)
    book.forget("gone")
    book.wrote("gone", ledger.Written("5", {"phase": "Serving"}))
    clock.now = 30
    book.wrote("u1", ledger.Written("12", {"phase": "Downloading"}))
    assert len(book) == 2, "within max_age both count"
    clock.now = 61
    book.wrote("u2", ledger.Written("13", {"phase": "Pending"}))
    assert len(book) == 2, "the gone model's entry is swept, u1's (31 s old) stays"
    assert book.newest(_body("10", "Pending"))["status"] == {"phase": "Downloading"}
