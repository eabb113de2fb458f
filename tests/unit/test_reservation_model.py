"""Stateful model test: the reservation rules against plain integers per (sku, location).

A ``RuleBasedStateMachine`` drives the pure rules the way the service does
(receive, damage with shrinkage handling, multi-line reserve, release, consume,
expire) on real ``StockRow``s and ``Reservation``s, next to a model that only
knows on-hand per key and what each active line still holds. After every step
the two must agree, nothing is held twice, and nothing is held that is not on
hand. One example test drives the service's own shrinkage step
(``ReservationHandlers._mark_short``) over fake storage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    MultipleResults,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    rule,
)

from omnistock.db import Connection, Pool
from omnistock.errors import FailedPrecondition
from omnistock.grpc.client import ChannelFactory
from services.reservation import handlers as reservation_handlers
from services.reservation import storage
from services.reservation.domain import (
    ChannelRules,
    InsufficientStock,
    Kind,
    Line,
    LineStatus,
    Reservation,
    Reserve,
    ReserveLine,
    Rules,
    StockKey,
    StockRow,
    check_release,
    consume,
    end_lines,
    lines_to_short,
    place,
    validate_reserve,
)

START = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
CART_TTL = timedelta(minutes=20)
SKUS = ("SKU-1", "SKU-2")
LOCATIONS = ("store-a", "store-b", "dc-c", "store-z")
KEYS: tuple[StockKey, ...] = tuple((sku, loc) for sku in SKUS for loc in LOCATIONS)
CHANNELS = ("web", "pos")

RULES = Rules(
    channels={
        "web": ChannelRules("web", ("store-a", "store-b", "store-z"), CART_TTL, safety_stock=1),
        "pos": ChannelRules("pos", ("store-a", "dc-c"), CART_TTL),
    },
    location_safety={"store-b": 2, "dc-c": 1},
    closed_locations=frozenset({"store-z"}),
)

# The model's own reading of RULES: where each channel may hold, and what it keeps back.
MODEL_SELLS = {"web": {"store-a", "store-b"}, "pos": {"store-a", "dc-c"}}
MODEL_SAFETY = {
    ("web", "store-a"): 1,
    ("web", "store-b"): 3,
    ("pos", "store-a"): 0,
    ("pos", "dc-c"): 1,
}


@dataclass
class ModelLine:
    """An active line of the model: where it holds and how many units it still holds."""

    key: StockKey
    remaining: int


class ReservationMachine(RuleBasedStateMachine):
    """Real rules on ``rows``/``reservations``; the model on ``on_hand``/``active``."""

    reservation_ids = Bundle("reservation_ids")

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[StockKey, StockRow] = {}
        self.reservations: dict[str, Reservation] = {}
        self.created: list[str] = []  # oldest first
        self.on_hand: dict[StockKey, int] = dict.fromkeys(KEYS, 0)
        self.active: dict[str, dict[int, ModelLine]] = {}
        self.clock = START
        self.steps = 0

    # -- helpers ------------------------------------------------------------------

    def tick(self) -> datetime:
        self.clock += timedelta(seconds=1)
        return self.clock

    def row(self, key: StockKey) -> StockRow:
        return self.rows.setdefault(key, StockRow(*key))

    def model_held(self, key: StockKey) -> int:
        return sum(
            line.remaining
            for lines in self.active.values()
            for line in lines.values()
            if line.key == key
        )

    def rows_snapshot(self) -> dict[StockKey, tuple[int, int]]:
        return {key: (row.on_hand, row.held) for key, row in self.rows.items()}

    def free(self, freed: dict[StockKey, int]) -> None:
        for key, units in freed.items():
            self.rows[key].held -= units

    def handle_shrinkage(self, key: StockKey) -> None:
        """What the service does after on-hand fell: short the newest lines that do not fit."""
        row = self.row(key)
        newest_first = [
            (rid, line)
            for rid in reversed(self.created)
            for line in self.reservations[rid].lines
            if line.key == key and line.status is LineStatus.ACTIVE
        ]
        chosen = lines_to_short(row, [line for _, line in newest_first])
        # lines_to_short walks the list it was given in order: it returns a prefix.
        assert [line for _, line in newest_first[: len(chosen)]] == chosen
        by_reservation: dict[str, list[Line]] = {}
        for rid, line in newest_first[: len(chosen)]:
            by_reservation.setdefault(rid, []).append(line)
        now = self.tick()
        for rid, lines in by_reservation.items():
            self.reservations[rid], freed = end_lines(
                self.reservations[rid], lines, LineStatus.SHORT, now
            )
            assert set(freed) == {key}
            self.free(freed)

        # The model: drop the newest lines at the key until what stays fits on hand.
        expected: list[tuple[str, int]] = []
        excess = self.model_held(key) - self.on_hand[key]
        for rid in reversed(self.created):
            for number, model_line in sorted(self.active.get(rid, {}).items()):
                if excess > 0 and model_line.key == key:
                    expected.append((rid, number))
                    excess -= model_line.remaining
        assert [(rid, line.line_number) for rid, line in newest_first[: len(chosen)]] == expected
        for rid, number in expected:
            del self.active[rid][number]

    # -- rules ----------------------------------------------------------------------

    @rule(key=st.sampled_from(KEYS), quantity=st.integers(min_value=1, max_value=20))
    def receive(self, key: StockKey, quantity: int) -> None:
        self.row(key).on_hand += quantity
        self.on_hand[key] += quantity

    @rule(key=st.sampled_from(KEYS), quantity=st.integers(min_value=1, max_value=20))
    def damage(self, key: StockKey, quantity: int) -> None:
        lost = min(quantity, self.on_hand[key])
        self.row(key).on_hand -= lost
        self.on_hand[key] -= lost
        self.handle_shrinkage(key)

    @initialize(
        stock=st.lists(
            st.integers(min_value=0, max_value=30), min_size=len(KEYS), max_size=len(KEYS)
        )
    )
    def stock_every_key(self, stock: list[int]) -> None:
        for key, quantity in zip(KEYS, stock, strict=True):
            self.row(key).on_hand = self.on_hand[key] = quantity

    @rule(data=st.data())
    def cycle_count(self, data: st.DataObject) -> None:
        """A count sets on-hand just around what a key holds: shrinkage at its edges."""
        keys = [key for key in KEYS if self.model_held(key)] or list(KEYS)
        key = data.draw(st.sampled_from(keys), "key")
        held = self.model_held(key)
        counted = data.draw(st.integers(min_value=max(0, held - 4), max_value=held + 2), "counted")
        self.row(key).on_hand = self.on_hand[key] = counted
        self.handle_shrinkage(key)

    @rule(
        target=reservation_ids,
        channel=st.sampled_from(CHANNELS),
        kind=st.sampled_from([Kind.CART, Kind.ORDER]),
        data=st.data(),
    )
    def reserve(self, channel: str, kind: Kind, data: st.DataObject) -> MultipleResults[str]:
        """Mostly at locations the channel sells from; now and then anywhere."""
        sold_at = [key for key in KEYS if key[1] in MODEL_SELLS[channel]]
        keys = data.draw(st.sampled_from([sold_at, sold_at, sold_at, list(KEYS)]), "where")
        lines = data.draw(
            st.lists(
                st.tuples(st.sampled_from(keys), st.integers(min_value=1, max_value=8)),
                min_size=1,
                max_size=3,
                unique_by=lambda line: line[0],
            ),
            "lines",
        )
        self.steps += 1
        rid = f"res-{self.steps}"
        command = Reserve(
            request_id=f"req-{self.steps}",
            channel=channel,
            reference=f"ref-{self.steps}",
            kind=kind,
            lines=tuple(ReserveLine(sku, loc, quantity) for (sku, loc), quantity in lines),
            ttl=None,
        )
        validate_reserve(command)
        for line in command.lines:  # the service reads a row for every line, as it does
            self.row(line.key)
        before = self.rows_snapshot()

        refused = [
            i
            for i, line in enumerate(command.lines)
            if line.location_id not in MODEL_SELLS[channel]
        ]
        available = {
            line.key: max(
                0,
                self.on_hand[line.key]
                - self.model_held(line.key)
                - MODEL_SAFETY.get((channel, line.location_id), 0),
            )
            for line in command.lines
        }
        short = [
            (i, line.sku, line.location_id, line.quantity, available[line.key])
            for i, line in enumerate(command.lines)
            if line.quantity > available[line.key]
        ]
        try:
            placed = place(command, self.rows, RULES, reservation_id=rid, now=self.tick())
        except InsufficientStock as error:
            assert not refused, "a location the channel cannot sell from must be refused first"
            assert [
                (s.index, s.sku, s.location_id, s.requested, s.available) for s in error.shortfalls
            ] == short
            assert self.rows_snapshot() == before, "a failed place changed a row"
            return multiple()
        except FailedPrecondition as error:
            assert error.reason == "LOCATION_NOT_SELLABLE"
            assert refused, f"refused a sellable location: {error.message}"
            assert error.metadata["index"] == str(refused[0])
            assert self.rows_snapshot() == before, "a failed place changed a row"
            return multiple()
        assert not refused, "held stock at a location the channel does not sell from"
        assert not short, f"held lines the model says do not fit: {short}"
        assert placed.status is LineStatus.ACTIVE
        assert (placed.expires_at is None) is (kind is Kind.ORDER)
        for line in command.lines:
            row = self.rows[line.key]
            safety = MODEL_SAFETY[(channel, line.location_id)]
            assert row.held == before[line.key][1] + line.quantity
            assert row.held <= row.on_hand - safety, f"oversold {line.key} for {channel}"
        self.reservations[rid] = placed
        self.created.append(rid)
        self.active[rid] = {
            number: ModelLine(line.key, line.quantity)
            for number, line in enumerate(command.lines, start=1)
        }
        return multiple(rid)

    @rule(
        rid=reservation_ids,
        numbers=st.lists(st.integers(min_value=1, max_value=4), unique=True, max_size=4),
    )
    def release(self, rid: str, numbers: list[int]) -> None:
        reservation = self.reservations[rid]
        named = [n for n in numbers if n <= len(reservation.lines)]
        model = self.active[rid]
        before = self.rows_snapshot()
        try:
            chosen = check_release(reservation, named, "")
        except FailedPrecondition as error:
            if named:
                assert error.reason == "LINE_ENDED"
                assert any(n not in model for n in named)
                assert int(error.metadata["line_number"]) not in model
            else:
                assert error.reason == "RESERVATION_ENDED"
                assert not model
            assert self.rows_snapshot() == before
            return
        expected = named or sorted(model)
        assert [line.line_number for line in chosen] == expected
        self.reservations[rid], freed = end_lines(
            reservation, chosen, LineStatus.RELEASED, self.tick()
        )
        self.free(freed)
        for number in expected:
            del model[number]

    @rule(
        rid=reservation_ids,
        number=st.integers(min_value=1, max_value=4),
        quantity=st.integers(min_value=1, max_value=10),
    )
    def consume(self, rid: str, number: int, quantity: int) -> None:
        reservation = self.reservations[rid]
        if number > len(reservation.lines):
            return
        target = reservation.lines[number - 1]
        model = self.active[rid].get(number)
        self.reservations[rid], line, used = consume(
            reservation, target.sku, target.location_id, quantity, self.tick()
        )
        if model is None:
            assert (line, used) == (None, 0)
            return
        assert used == min(quantity, model.remaining)
        assert line is not None and line.line_number == number
        model.remaining -= used
        if model.remaining == 0:
            assert line.status is LineStatus.CONSUMED
            del self.active[rid][number]
        else:
            assert line.status is LineStatus.ACTIVE
        # The goods left: the ledger's shipment lowers on-hand by what was used.
        row = self.rows[target.key]
        row.held -= used
        row.on_hand -= used
        self.on_hand[target.key] -= used

    @rule(rid=reservation_ids)
    def expire(self, rid: str) -> None:
        reservation = self.reservations[rid]
        if reservation.kind is not Kind.CART or not reservation.active:
            return  # the sweeper claims active cart holds only
        active = [line for line in reservation.lines if line.status is LineStatus.ACTIVE]
        self.reservations[rid], freed = end_lines(
            reservation, active, LineStatus.EXPIRED, self.tick()
        )
        expected: dict[StockKey, int] = {}
        for line in self.active[rid].values():
            expected[line.key] = expected.get(line.key, 0) + line.remaining
        assert freed == expected
        self.free(freed)
        self.active[rid] = {}
        assert not self.reservations[rid].active

    # -- invariants -----------------------------------------------------------------

    @invariant()
    def rows_agree_with_the_reservations_and_the_model(self) -> None:
        for key in KEYS:
            row = self.rows.get(key, StockRow(*key))
            by_lines = sum(
                line.held
                for reservation in self.reservations.values()
                for line in reservation.lines
                if line.key == key
            )
            assert row.held == by_lines == self.model_held(key), key
            assert row.on_hand == self.on_hand[key], key

    @invariant()
    def nothing_is_held_that_is_not_on_hand(self) -> None:
        for key, row in self.rows.items():
            assert 0 <= row.held <= row.on_hand, (key, row)

    @invariant()
    def every_line_matches_the_model(self) -> None:
        for rid, reservation in self.reservations.items():
            model = self.active[rid]
            for line in reservation.lines:
                if line.status is LineStatus.ACTIVE:
                    assert line.held == model[line.line_number].remaining > 0
                else:
                    assert line.line_number not in model
            assert reservation.active is bool(model)


TestReservationModel = ReservationMachine.TestCase
TestReservationModel.settings = settings(
    max_examples=150,
    stateful_step_count=30,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# -- the service's own shrinkage step -------------------------------------------------


def cart(reservation_id: str, created_at: datetime, *lines: Line) -> Reservation:
    return Reservation(
        reservation_id=reservation_id,
        channel="web",
        reference=f"cart-{reservation_id}",
        kind=Kind.CART,
        lines=lines,
        created_at=created_at,
        updated_at=created_at,
        expires_at=created_at + CART_TTL,
    )


async def mark_short(
    monkeypatch: pytest.MonkeyPatch, stored: Sequence[Reservation], row: StockRow
) -> dict[str, Reservation]:
    """Run ``ReservationHandlers._mark_short`` over fake storage; returns what it saved."""
    by_id = {reservation.reservation_id: reservation for reservation in stored}
    newest_first = [r.reservation_id for r in sorted(stored, key=lambda r: r.created_at)][::-1]
    saved: dict[str, Reservation] = {}

    async def active_reservations_at(conn: Any, key: StockKey) -> list[str]:
        return [
            rid
            for rid in newest_first
            if any(
                line.key == key and line.status is LineStatus.ACTIVE for line in by_id[rid].lines
            )
        ]

    async def load_reservations(
        conn: Any, ids: Sequence[str], lock: bool = False
    ) -> dict[str, Reservation]:
        return {rid: by_id[rid] for rid in ids}

    async def save_reservations(conn: Any, reservations: Sequence[Reservation]) -> None:
        saved.update((r.reservation_id, r) for r in reservations)

    async def save_stock(conn: Any, rows: Sequence[StockRow]) -> None:
        return None

    monkeypatch.setattr(storage, "active_reservations_at", active_reservations_at)
    monkeypatch.setattr(storage, "load_reservations", load_reservations)
    monkeypatch.setattr(storage, "save_reservations", save_reservations)
    monkeypatch.setattr(storage, "save_stock", save_stock)
    service = reservation_handlers.ReservationHandlers(
        cast(Pool, None),
        ledger_target="unused:0",
        channels=ChannelFactory(),
        short_grace=timedelta(minutes=5),
        max_batch=8,
    )
    await service._mark_short(cast(Connection, None), row, "loss")
    return saved


async def test_the_service_shorts_only_the_lines_the_rule_chose(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Two carts hold 5 of SKU-1 at store-a each, on line 1: equal Line values.
    older = cart("res-old", START, Line(1, "SKU-1", "store-a", 5))
    newer = cart("res-new", START + timedelta(seconds=1), Line(1, "SKU-1", "store-a", 5))
    row = StockRow("SKU-1", "store-a", on_hand=9, held=10)  # one unit was damaged
    assert lines_to_short(row, [newer.lines[0], older.lines[0]]) == [newer.lines[0]]

    saved = await mark_short(monkeypatch, [older, newer], row)

    assert {rid: r.status for rid, r in saved.items()} == {"res-new": LineStatus.SHORT}
    assert (row.on_hand, row.held) == (9, 5)


async def test_the_service_shorts_newest_lines_first_across_reservations(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    older = cart("res-old", START, Line(1, "SKU-1", "store-a", 4), Line(2, "SKU-2", "store-a", 1))
    newer = cart(
        "res-new",
        START + timedelta(seconds=1),
        Line(1, "SKU-2", "store-a", 2),
        Line(2, "SKU-1", "store-a", 3),
    )
    row = StockRow("SKU-1", "store-a", on_hand=2, held=7)

    saved = await mark_short(monkeypatch, [older, newer], row)

    assert [line.status for line in saved["res-new"].lines] == [
        LineStatus.ACTIVE,
        LineStatus.SHORT,
    ]
    assert [line.status for line in saved["res-old"].lines] == [
        LineStatus.SHORT,
        LineStatus.ACTIVE,
    ]
    assert (row.on_hand, row.held) == (2, 0)
