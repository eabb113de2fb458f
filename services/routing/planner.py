"""The sourcing planner: which locations fulfil an order, at what cost, and why.

Pure and deterministic: the same problem, network and rules give the same plan
(every ordering ends on the location id). No I/O; the handlers gather the
facts (availability, capacity used today, locations) and keep the answer.

The cost of a shipment is a fixed cost, plus handling by source kind, plus a
rate per kilometre of great-circle distance. The plan with the fewest shipments
wins unless the cheapest plan overall is cheaper by the split margin. Both are
found exactly by a branch-and-bound over the locations that have stock: every
feasible set of sources contains a location with stock of the most constrained
line, so branching on those, cheapest first, and cutting at the best cost found
visits every set that could win.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from enum import Enum

from omnistock.geo import haversine_km

# A hard ceiling on search nodes; real orders finish far below it. A search that
# reaches it keeps the best plan found so far and says so (``exhaustive``).
NODE_BUDGET = 20_000
MAX_SUGGESTIONS = 3
# Rounds of local search that improve the first covering plan before the exact search.
MAX_IMPROVEMENTS = 20


class SourceKind(Enum):
    """What kind of location a source is."""

    STORE = "store"
    DISTRIBUTION_CENTRE = "distribution_centre"


class Method(Enum):
    """How the customer receives the order."""

    SHIP_TO_HOME = "ship_to_home"
    CLICK_AND_COLLECT = "click_and_collect"


class FulfilmentType(Enum):
    """What a source does for the order."""

    SHIP_FROM_STORE = "ship_from_store"
    SHIP_FROM_DISTRIBUTION_CENTRE = "ship_from_distribution_centre"
    PICKUP_AT_STORE = "pickup_at_store"
    TRANSFER_TO_STORE = "transfer_to_store"


class Outcome(Enum):
    """The verdict on one candidate location."""

    CHOSEN = "chosen"
    NO_STOCK = "no_stock"
    OVER_CAPACITY = "over_capacity"
    NOT_ALLOWED_FOR_CHANNEL = "not_allowed_for_channel"
    TOO_FAR = "too_far"
    TOO_LATE = "too_late"
    CLOSED = "closed"
    EXCLUDED = "excluded"
    FAILED_BEFORE = "failed_before"
    NOT_CAPABLE = "not_capable"
    MORE_EXPENSIVE = "more_expensive"
    SPLIT_NOT_ALLOWED = "split_not_allowed"


@dataclass(frozen=True)
class GeoPoint:
    """A position in degrees."""

    latitude: float
    longitude: float


@dataclass(frozen=True)
class Location:
    """What routing knows of a location (announced by the ledger)."""

    location_id: str
    kind: SourceKind
    name: str
    position: GeoPoint
    ship_from_store: bool = False
    click_and_collect: bool = False
    accepts_returns: bool = False
    daily_capacity: int = 0  # orders a day; 0 is no limit
    closed: bool = False


@dataclass(frozen=True)
class Rules:
    """The routing rules; every plan records the version that made it."""

    version: int = 0
    shipment_cost_cents: int = 495
    cost_per_km_cents: int = 2
    store_handling_cents: int = 250
    distribution_centre_handling_cents: int = 100
    transfer_cost_cents: int = 150
    split_margin_percent: int = 10
    max_ship_from_store_km: int = 0
    distribution_centre_delivery_days: int = 1
    store_delivery_days: int = 1
    transfer_days: int = 2
    pickup_ready_hours: int = 2
    nearby_store_km: int = 25
    excluded_location_ids: frozenset[str] = frozenset()
    priorities: Mapping[str, int] = field(default_factory=dict)
    priority_step_cents: int = 0
    max_replans: int = 3
    time_zone: str = "Europe/Amsterdam"

    def handling_cents(self, kind: SourceKind) -> int:
        """Handling cost of one shipment from a location of ``kind``."""
        if kind is SourceKind.STORE:
            return self.store_handling_cents
        return self.distribution_centre_handling_cents


@dataclass(frozen=True)
class Need:
    """Units of one order line still to source."""

    line_number: int
    sku: str
    quantity: int


@dataclass(frozen=True)
class Problem:
    """One sourcing question: these units, to this customer, now."""

    channel: str
    method: Method
    needs: tuple[Need, ...]
    now: datetime
    destination: GeoPoint | None = None  # home delivery
    pickup_location_id: str = ""  # click-and-collect
    allow_split: bool = True
    deliver_by: datetime | None = None


@dataclass(frozen=True)
class Network:
    """The facts of the moment: locations, what each may promise, capacity left."""

    locations: Mapping[str, Location]
    # Available-to-promise for the order's channel per (sku, location).
    available: Mapping[tuple[str, str], int]
    # Locations the channel sells from.
    sellable: frozenset[str]
    # Orders each capacity-limited location can still take today.
    capacity_left: Mapping[str, int] = field(default_factory=dict)
    # Sources that failed this order before.
    failed: frozenset[str] = frozenset()


@dataclass(frozen=True)
class PlannedLine:
    """Units of one line from one source."""

    line_number: int
    sku: str
    quantity: int


@dataclass(frozen=True)
class Shipment:
    """One source's part of the plan."""

    source_id: str
    source_kind: SourceKind
    type: FulfilmentType
    lines: tuple[PlannedLine, ...]
    distance_km: float
    cost_cents: int
    estimated_at: datetime
    pickup_location_id: str = ""


@dataclass(frozen=True)
class Unsourced:
    """Units no location could source, and why."""

    line_number: int
    sku: str
    quantity: int
    reason: str


@dataclass(frozen=True)
class Verdict:
    """Why one location was or was not chosen."""

    location_id: str
    outcome: Outcome
    distance_km: float
    cost_cents: int
    extra_cost_cents: int
    explanation: str


@dataclass(frozen=True)
class Suggestion:
    """A store near the pickup store that has the whole order now."""

    location_id: str
    name: str
    distance_km: float
    ready_at: datetime


@dataclass(frozen=True)
class Plan:
    """The planner's answer."""

    shipments: tuple[Shipment, ...]
    unsourced: tuple[Unsourced, ...]
    total_cost_cents: int
    estimated_at: datetime | None
    verdicts: tuple[Verdict, ...]
    suggestions: tuple[Suggestion, ...]
    summary: str
    rules_version: int
    exhaustive: bool = True
    # Locations holding none of the order, counted per verdict.
    unlisted: tuple[tuple[Outcome, int], ...] = ()

    @property
    def sources(self) -> list[str]:
        """The chosen source locations, in shipment order."""
        return [s.source_id for s in self.shipments]


# -- geometry and money ---------------------------------------------------------


def money(cents: int) -> str:
    """Cents as an amount a person reads, e.g. 1234 → "12.34"."""
    sign = "-" if cents < 0 else ""
    return f"{sign}{abs(cents) // 100}.{abs(cents) % 100:02d}"


# -- the search -----------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """An eligible source: what it can supply and what a shipment from it costs."""

    location: Location
    distance_km: float
    cost_cents: int
    # The cost the search minimises: cost less the location's priority bonus,
    # never below one cent so a free source is still worth leaving out.
    score: int
    supply: Mapping[int, int]  # need index → units it can give
    estimated_at: datetime

    @property
    def location_id(self) -> str:
        """The location's id."""
        return self.location.location_id


@dataclass
class _Search:
    """Branch-and-bound for the cheapest set of sources covering ``need``."""

    by_need: dict[int, list[Candidate]]
    steps: int = 0
    exhausted_budget: bool = False

    def __post_init__(self) -> None:
        # Per line, sources by cost per unit: the order the fractional bound fills in.
        self.by_rate = {i: sorted(cs, key=_rate_key(i)) for i, cs in self.by_need.items()}

    def _floor(self, i: int, q: int, taken: set[str]) -> float | None:
        """A lower bound on finishing line ``i`` (``q`` units) from sources not taken.

        At least one whole source, and at least the cheapest fractional cover
        (the linear relaxation of covering this line alone). None if impossible.
        """
        cheapest: float | None = None
        fractional, left = 0.0, q
        for c in self.by_rate[i]:
            self.steps += 1
            if c.location_id in taken:
                continue
            give = min(left, c.supply[i])
            fractional += c.score * give / c.supply[i]
            left -= give
            if left == 0:
                break
        if left:
            return None
        for c in self.by_need[i]:
            if c.location_id not in taken:
                cheapest = c.score
                break
        return max(fractional, cheapest or 0)

    def best(
        self, need: Mapping[int, int], bound: int, seed: tuple[Candidate, ...]
    ) -> tuple[Candidate, ...]:
        """The cheapest covering set with a score below ``bound``, else ``seed``."""
        best: list[tuple[int, tuple[Candidate, ...]]] = [(bound, seed)]

        def recurse(chosen: tuple[Candidate, ...], left: dict[int, int], score: int) -> None:
            if not left:
                if score < best[0][0]:
                    best[0] = (score, chosen)
                return
            taken = {c.location_id for c in chosen}
            # Every line left needs at least one more source: the dearest of their
            # cheapest open sources bounds what finishing can cost.
            floor = 0.0
            for i, q in left.items():
                line_floor = self._floor(i, q, taken)
                if line_floor is None:
                    return  # nothing left can give this line
                floor = max(floor, line_floor)
            if score + floor >= best[0][0]:
                return
            # Branch on the line with the fewest possible sources.
            pivot = min(left, key=lambda i: (len(self.by_need[i]), i))
            for candidate in self.by_need[pivot]:
                self.steps += 1
                if self.steps > NODE_BUDGET:
                    self.exhausted_budget = True
                    return
                if score + candidate.score >= best[0][0]:
                    break  # sorted by score: nothing later is cheaper
                if candidate.location_id in taken:
                    continue
                rest = {
                    i: q - candidate.supply.get(i, 0)
                    for i, q in left.items()
                    if q > candidate.supply.get(i, 0)
                }
                recurse((*chosen, candidate), rest, score + candidate.score)

        recurse((), dict(need), 0)
        return best[0][1]


def _rate_key(i: int) -> Callable[[Candidate], tuple[float, str]]:
    """Order by cost per unit of need ``i``."""
    return lambda c: (c.score / c.supply[i], c.location_id)


def _sort_key(c: Candidate) -> tuple[int, str]:
    return (c.score, c.location_id)


def _score(chosen: Sequence[Candidate]) -> int:
    return sum(c.score for c in chosen)


def greedy(candidates: Sequence[Candidate], need: Mapping[int, int]) -> tuple[Candidate, ...]:
    """A quick covering set: repeatedly the source giving most units per cent.

    Empty when ``need`` cannot be covered at all.
    """
    left = {i: q for i, q in need.items() if q > 0}
    chosen: list[Candidate] = []
    pool = sorted(candidates, key=_sort_key)
    while left:
        best: Candidate | None = None
        best_rate = 0.0
        for c in pool:
            units = sum(min(q, c.supply.get(i, 0)) for i, q in left.items())
            if units and units / c.score > best_rate:
                best, best_rate = c, units / c.score
        if best is None:
            return ()
        chosen.append(best)
        pool.remove(best)
        left = {i: q - best.supply.get(i, 0) for i, q in left.items() if q > best.supply.get(i, 0)}
    return _without_redundant(chosen, need)


def _covers(chosen: Sequence[Candidate], need: Mapping[int, int]) -> bool:
    return all(sum(c.supply.get(i, 0) for c in chosen) >= q for i, q in need.items())


def _without_redundant(
    chosen: Sequence[Candidate], need: Mapping[int, int]
) -> tuple[Candidate, ...]:
    """Drop sources the others make redundant, dearest first."""
    kept = list(chosen)
    for c in sorted(chosen, key=_sort_key, reverse=True):
        rest = [o for o in kept if o is not c]
        if _covers(rest, need):
            kept = rest
    return tuple(kept)


def improve(
    candidates: Sequence[Candidate], need: Mapping[int, int], chosen: tuple[Candidate, ...]
) -> tuple[Candidate, ...]:
    """Local search from a covering set: add a source and drop what it makes
    redundant, or swap one out and complete greedily, while that is cheaper.

    A good first plan makes the exact search cut early; on its own it is the
    answer when the search runs out of budget.
    """
    best, best_score = chosen, _score(chosen)
    for _ in range(MAX_IMPROVEMENTS):
        found = None
        for c in sorted(candidates, key=_sort_key):
            if c.score >= best_score or c in best:
                continue
            trial = _without_redundant((*best, c), need)
            if _score(trial) < best_score:
                found = trial
                break
        if found is None:
            for out in best:
                rest = [o for o in best if o is not out]
                left = {
                    i: q - sum(o.supply.get(i, 0) for o in rest)
                    for i, q in need.items()
                    if q > sum(o.supply.get(i, 0) for o in rest)
                }
                pool = [c for c in candidates if c is not out and c not in rest]
                completion = greedy(pool, left)
                if left and not completion:
                    continue
                trial = _without_redundant((*rest, *completion), need)
                if _score(trial) < best_score:
                    found = trial
                    break
        if found is None:
            return best
        best, best_score = found, _score(found)
    return best


def solve(
    candidates: Sequence[Candidate],
    need: Mapping[int, int],
    *,
    allow_split: bool,
    split_margin_percent: int,
) -> tuple[tuple[Candidate, ...], bool] | None:
    """The chosen sources for ``need``, and whether the search was exhaustive.

    One shipment when one source has everything, unless the cheapest plan
    overall is cheaper by the split margin; otherwise the cheapest plan overall.
    None when no set of sources covers ``need`` (or, without a split, no single
    source does).
    """
    whole = [c for c in candidates if all(c.supply.get(i, 0) >= q for i, q in need.items())]
    single = min(whole, key=_sort_key, default=None)
    if not allow_split:
        return ((single,), True) if single is not None else None
    by_need: dict[int, list[Candidate]] = {
        i: sorted((c for c in candidates if c.supply.get(i, 0) > 0), key=_sort_key) for i in need
    }
    search = _Search(by_need)
    if single is not None:
        # A split must beat the single shipment by the margin.
        bound = math.floor(single.score * (100 - split_margin_percent) / 100) + 1
        chosen = search.best(need, bound, (single,))
        if search.exhausted_budget:
            # The search ran out before proving the single shipment best: a
            # locally optimal split that beats the margin is the better answer.
            split = improve(candidates, need, greedy(candidates, need))
            if split and _score(split) < min(bound, _score(chosen)):
                chosen = split
    else:
        seed = greedy(candidates, need)
        if not seed:
            return None
        seed = improve(candidates, need, seed)
        chosen = search.best(need, _score(seed), seed)
    return tuple(sorted(chosen, key=_sort_key)), not search.exhausted_budget


def assign(
    chosen: Sequence[Candidate], needs: Sequence[Need], need: Mapping[int, int]
) -> dict[str, list[PlannedLine]]:
    """Units per source: a whole line from one source where one can give it all
    (the cheapest such), otherwise split cheapest first."""
    out: dict[str, list[PlannedLine]] = {c.location_id: [] for c in chosen}
    for i, quantity in sorted(need.items()):
        whole = next((c for c in chosen if c.supply.get(i, 0) >= quantity), None)
        parts = [whole] if whole is not None else list(chosen)
        left = quantity
        for c in parts:
            take = min(left, c.supply.get(i, 0))
            if take > 0:
                out[c.location_id].append(PlannedLine(needs[i].line_number, needs[i].sku, take))
                left -= take
            if left == 0:
                break
    return {loc: lines for loc, lines in out.items() if lines}


# -- the planner ------------------------------------------------------------------


@dataclass
class _Screen:
    """Candidates that passed the checks, and verdicts for those that did not."""

    candidates: list[Candidate] = field(default_factory=list)
    verdicts: dict[str, Verdict] = field(default_factory=dict)
    # Locations holding none of the order, counted per verdict, not listed.
    unlisted: dict[Outcome, int] = field(default_factory=dict)

    def reject(self, loc: Location, outcome: Outcome, distance: float, cost: int, why: str) -> None:
        self.verdicts[loc.location_id] = Verdict(
            loc.location_id, outcome, round(distance, 1), cost, 0, why
        )


def plan(problem: Problem, network: Network, rules: Rules) -> Plan:
    """The plan for ``problem``: shipments, unsourced units and a verdict per location."""
    if problem.method is Method.CLICK_AND_COLLECT:
        return _plan_pickup(problem, network, rules)
    return _plan_home(problem, network, rules)


def _eta_days(kind: SourceKind, rules: Rules) -> int:
    if kind is SourceKind.STORE:
        return rules.store_delivery_days
    return rules.distribution_centre_delivery_days


def _screen(
    problem: Problem,
    network: Network,
    rules: Rules,
    target: GeoPoint,
    *,
    transfer_to: str = "",
) -> _Screen:
    """Check every location as a source for the needs, shipping to ``target``.

    Locations holding none of the order are only counted (no stock, or not
    sold by the channel): with hundreds of locations, the reasons worth
    reading are those of the locations that could have given something.
    """
    screen = _Screen()
    needs = problem.needs
    for loc_id in sorted(network.locations):
        loc = network.locations[loc_id]
        if loc_id == transfer_to:
            continue
        supply = {
            i: min(n.quantity, units)
            for i, n in enumerate(needs)
            if (units := network.available.get((n.sku, loc_id), 0)) > 0
        }
        if not supply and loc_id not in network.failed:
            outcome = (
                Outcome.NO_STOCK if loc_id in network.sellable else Outcome.NOT_ALLOWED_FOR_CHANNEL
            )
            screen.unlisted[outcome] = screen.unlisted.get(outcome, 0) + 1
            continue
        distance = haversine_km(loc.position, target)
        if transfer_to:
            fixed = rules.transfer_cost_cents
            eta = problem.now + timedelta(days=rules.transfer_days)
        else:
            fixed = rules.shipment_cost_cents
            eta = problem.now + timedelta(days=_eta_days(loc.kind, rules))
        cost = fixed + rules.handling_cents(loc.kind) + round(distance * rules.cost_per_km_cents)
        if loc_id not in network.sellable:
            screen.reject(
                loc, Outcome.NOT_ALLOWED_FOR_CHANNEL, distance, cost,
                f"channel {problem.channel} does not sell from {loc.name}",
            )  # fmt: skip
            continue
        if loc.closed:
            screen.reject(loc, Outcome.CLOSED, distance, cost, f"{loc.name} is closed")
            continue
        if loc_id in rules.excluded_location_ids:
            screen.reject(
                loc, Outcome.EXCLUDED, distance, cost, f"the routing rules exclude {loc.name}"
            )
            continue
        if loc_id in network.failed:
            screen.reject(
                loc, Outcome.FAILED_BEFORE, distance, cost,
                f"{loc.name} could not fulfil this order before",
            )  # fmt: skip
            continue
        if loc.kind is SourceKind.STORE and not loc.ship_from_store:
            what = "send transfers" if transfer_to else "ship to customers"
            screen.reject(loc, Outcome.NOT_CAPABLE, distance, cost, f"{loc.name} does not {what}")
            continue
        if (
            not transfer_to
            and loc.kind is SourceKind.STORE
            and rules.max_ship_from_store_km
            and distance > rules.max_ship_from_store_km
        ):
            screen.reject(
                loc, Outcome.TOO_FAR, distance, cost,
                f"{loc.name} is {distance:.0f} km away; stores ship at most "
                f"{rules.max_ship_from_store_km} km",
            )  # fmt: skip
            continue
        if problem.deliver_by is not None and eta > problem.deliver_by:
            screen.reject(
                loc, Outcome.TOO_LATE, distance, cost,
                f"from {loc.name} the order would arrive {eta:%Y-%m-%d}, after the latest date",
            )  # fmt: skip
            continue
        if not supply:
            screen.reject(loc, Outcome.NO_STOCK, distance, cost, f"{loc.name} has none of it")
            continue
        if loc.daily_capacity and network.capacity_left.get(loc_id, loc.daily_capacity) <= 0:
            screen.reject(
                loc, Outcome.OVER_CAPACITY, distance, cost,
                f"{loc.name} has reached its {loc.daily_capacity} orders for today",
            )  # fmt: skip
            continue
        bonus = rules.priorities.get(loc_id, 0) * rules.priority_step_cents
        screen.candidates.append(Candidate(loc, distance, cost, max(1, cost - bonus), supply, eta))
    return screen


def _coverable(needs: Sequence[Need], candidates: Sequence[Candidate]) -> dict[int, int]:
    """Per need, the units all candidates together can give (capped at the need)."""
    return {
        i: min(n.quantity, sum(c.supply.get(i, 0) for c in candidates)) for i, n in enumerate(needs)
    }


def _source(
    problem: Problem,
    screen: _Screen,
    needs: Sequence[Need],
    rules: Rules,
    shipment_type: _TypeFor,
    pickup_location_id: str = "",
) -> tuple[list[Shipment], list[Unsourced], bool]:
    """Choose sources for ``needs`` among the screened candidates."""
    need = {i: n.quantity for i, n in enumerate(needs) if n.quantity > 0}
    coverable = _coverable(needs, screen.candidates)
    unsourced: list[Unsourced] = []
    if problem.allow_split:
        for i, q in need.items():
            if coverable[i] < q:
                unsourced.append(
                    Unsourced(
                        needs[i].line_number,
                        needs[i].sku,
                        q - coverable[i],
                        f"only {coverable[i]} of {q} units available for channel {problem.channel}",
                    )
                )
        need = {i: coverable[i] for i in need if coverable[i] > 0}
    result = solve(
        screen.candidates,
        need,
        allow_split=problem.allow_split,
        split_margin_percent=rules.split_margin_percent,
    )
    if result is None:
        if need:
            why = (
                "no single location has the whole order and splitting is not allowed"
                if not problem.allow_split
                else "no location can source it"
            )
            unsourced += [
                Unsourced(needs[i].line_number, needs[i].sku, q, why) for i, q in need.items()
            ]
        return [], sorted(unsourced, key=lambda u: u.line_number), True
    chosen, exhaustive = result
    parts = assign(chosen, needs, need)
    shipments = [
        Shipment(
            c.location_id,
            c.location.kind,
            shipment_type(c.location.kind),
            tuple(parts[c.location_id]),
            round(c.distance_km, 1),
            c.cost_cents,
            c.estimated_at,
            pickup_location_id,
        )
        for c in chosen
        if c.location_id in parts
    ]
    return shipments, sorted(unsourced, key=lambda u: u.line_number), exhaustive


class _TypeFor:
    """The fulfilment type a source of some kind gets."""

    def __init__(self, store: FulfilmentType, centre: FulfilmentType) -> None:
        self._store, self._centre = store, centre

    def __call__(self, kind: SourceKind) -> FulfilmentType:
        return self._store if kind is SourceKind.STORE else self._centre


_SHIP = _TypeFor(FulfilmentType.SHIP_FROM_STORE, FulfilmentType.SHIP_FROM_DISTRIBUTION_CENTRE)
_TRANSFER = _TypeFor(FulfilmentType.TRANSFER_TO_STORE, FulfilmentType.TRANSFER_TO_STORE)


def _plan_home(problem: Problem, network: Network, rules: Rules) -> Plan:
    if problem.destination is None:
        raise ValueError("a home delivery needs a destination")
    screen = _screen(problem, network, rules, problem.destination)
    shipments, unsourced, exhaustive = _source(problem, screen, problem.needs, rules, _SHIP)
    return _finish(problem, rules, screen, shipments, unsourced, (), exhaustive)


def _plan_pickup(problem: Problem, network: Network, rules: Rules) -> Plan:
    store = network.locations[problem.pickup_location_id]
    needs = problem.needs
    ready = problem.now + timedelta(hours=rules.pickup_ready_hours)
    own = _own_stock_verdict(problem, network, rules, store, ready)
    shelf: list[PlannedLine] = []
    if own.outcome is Outcome.CHOSEN:
        for n in needs:
            take = min(n.quantity, network.available.get((n.sku, store.location_id), 0))
            if take:
                shelf.append(PlannedLine(n.line_number, n.sku, take))
    taken = {p.line_number: p.quantity for p in shelf}
    rest = tuple(
        Need(n.line_number, n.sku, n.quantity - taken.get(n.line_number, 0))
        for n in needs
        if n.quantity > taken.get(n.line_number, 0)
    )
    if rest and shelf and not problem.allow_split:
        # Without a split everything comes from the shelf or from one transfer.
        shelf, rest = [], needs
        own = replace(
            own,
            outcome=Outcome.SPLIT_NOT_ALLOWED,
            explanation=f"{store.name} has only part of the order on its shelves "
            "and it may not be split",
        )
    # Transfer sources are screened against what the shelf cannot give.
    sub = replace(problem, needs=rest or needs)
    screen = _screen(sub, network, rules, store.position, transfer_to=store.location_id)
    shipments: list[Shipment] = []
    unsourced: list[Unsourced] = []
    exhaustive = True
    if rest:
        shipments, unsourced, exhaustive = _source(
            sub, screen, rest, rules, _TRANSFER, store.location_id
        )
    if shelf:
        shelf_ready = max([ready, *(s.estimated_at for s in shipments)])
        shipments.insert(
            0,
            Shipment(
                store.location_id,
                store.kind,
                FulfilmentType.PICKUP_AT_STORE,
                tuple(shelf),
                0.0,
                rules.store_handling_cents,
                shelf_ready,
                store.location_id,
            ),
        )
        what = "everything" if not rest else "part of the order"
        own = replace(
            own, explanation=f"{store.name} is the pickup store and has {what} on its shelves"
        )
    screen.verdicts[store.location_id] = own
    suggestions = _suggestions(problem, network, rules, store) if rest else ()
    # With part on the shelf, every alternative keeps the shelf part: sources
    # compete on the transfers alone. With all of it there, they replace it.
    shelf_cents = rules.store_handling_cents if shelf and rest else 0
    plan = _finish(
        sub, rules, screen, shipments, unsourced, suggestions, exhaustive, shared_cents=shelf_cents
    )
    return replace(plan, summary=_summary(problem, shipments, unsourced, plan.total_cost_cents))


def _own_stock_verdict(
    problem: Problem, network: Network, rules: Rules, store: Location, ready: datetime
) -> Verdict:
    """Can the pickup store give units from its own shelves?"""

    def verdict(outcome: Outcome, why: str) -> Verdict:
        return Verdict(store.location_id, outcome, 0.0, rules.store_handling_cents, 0, why)

    if store.location_id not in network.sellable:
        return verdict(
            Outcome.NOT_ALLOWED_FOR_CHANNEL,
            f"channel {problem.channel} does not sell from {store.name}; everything is transferred",
        )
    if store.location_id in rules.excluded_location_ids:
        return verdict(Outcome.EXCLUDED, f"the routing rules exclude {store.name}'s shelves")
    if store.location_id in network.failed:
        return verdict(Outcome.FAILED_BEFORE, f"{store.name}'s shelves failed this order before")
    if problem.deliver_by is not None and ready > problem.deliver_by:
        return verdict(Outcome.TOO_LATE, f"{store.name} cannot have it ready by the latest date")
    if not any(network.available.get((n.sku, store.location_id), 0) for n in problem.needs):
        return verdict(Outcome.NO_STOCK, f"{store.name} has none of it on its shelves")
    if store.daily_capacity and network.capacity_left.get(store.location_id, 1) <= 0:
        return verdict(
            Outcome.OVER_CAPACITY,
            f"{store.name} has reached its {store.daily_capacity} orders for today",
        )
    return verdict(Outcome.CHOSEN, f"{store.name} has it on its shelves")


def _suggestions(
    problem: Problem, network: Network, rules: Rules, store: Location
) -> tuple[Suggestion, ...]:
    """Open click-and-collect stores near the pickup store with the whole order now."""
    ready = problem.now + timedelta(hours=rules.pickup_ready_hours)
    found = []
    for loc_id in sorted(network.locations):
        loc = network.locations[loc_id]
        if (
            loc_id == store.location_id
            or loc.kind is not SourceKind.STORE
            or not loc.click_and_collect
            or loc.closed
            or loc_id not in network.sellable
            or loc_id in rules.excluded_location_ids
            or (loc.daily_capacity and network.capacity_left.get(loc_id, 1) <= 0)
        ):
            continue
        if any(network.available.get((n.sku, loc_id), 0) < n.quantity for n in problem.needs):
            continue
        distance = haversine_km(store.position, loc.position)
        if distance <= rules.nearby_store_km:
            found.append(Suggestion(loc_id, loc.name, round(distance, 1), ready))
    found.sort(key=lambda s: (s.distance_km, s.location_id))
    return tuple(found[:MAX_SUGGESTIONS])


def _finish(
    problem: Problem,
    rules: Rules,
    screen: _Screen,
    shipments: Sequence[Shipment],
    unsourced: Sequence[Unsourced],
    suggestions: tuple[Suggestion, ...],
    exhaustive: bool,
    *,
    shared_cents: int = 0,
) -> Plan:
    total = sum(s.cost_cents for s in shipments)
    chosen = {s.source_id for s in shipments}
    verdicts = dict(screen.verdicts)
    cheapest_for = _cheapest_per_need(screen.candidates)
    for c in screen.candidates:
        if c.location_id in chosen:
            verdicts[c.location_id] = Verdict(
                c.location_id, Outcome.CHOSEN, round(c.distance_km, 1), c.cost_cents, 0,
                f"{c.location.name} is {c.distance_km:.0f} km away; "
                f"its shipment costs {money(c.cost_cents)}",
            )  # fmt: skip
            continue
        verdicts[c.location_id] = _runner_up(
            problem, c, total - shared_cents, cheapest_for, bool(shipments)
        )
    ordered = tuple(sorted(verdicts.values(), key=_verdict_order))
    estimated = max((s.estimated_at for s in shipments), default=None)
    return Plan(
        shipments=tuple(shipments),
        unsourced=tuple(unsourced),
        total_cost_cents=total,
        estimated_at=estimated,
        verdicts=ordered,
        suggestions=suggestions,
        summary=_summary(problem, shipments, unsourced, total),
        rules_version=rules.version,
        exhaustive=exhaustive,
        unlisted=tuple(sorted(screen.unlisted.items(), key=lambda kv: _OUTCOME_ORDER[kv[0]])),
    )


def _cheapest_per_need(candidates: Sequence[Candidate]) -> dict[int, list[Candidate]]:
    """The two cheapest candidates with stock of each need (enough to exclude one)."""
    best: dict[int, list[Candidate]] = {}
    for c in sorted(candidates, key=_sort_key):
        for i in c.supply:
            slot = best.setdefault(i, [])
            if len(slot) < 2:
                slot.append(c)
    return best


def _runner_up(
    problem: Problem,
    c: Candidate,
    total: int,
    cheapest_for: Mapping[int, list[Candidate]],
    planned: bool,
) -> Verdict:
    """The verdict on an eligible source the plan did not use."""
    distance = round(c.distance_km, 1)
    whole = all(c.supply.get(i, 0) >= n.quantity for i, n in enumerate(problem.needs))
    if not whole and not problem.allow_split:
        return Verdict(
            c.location_id, Outcome.SPLIT_NOT_ALLOWED, distance, c.cost_cents, 0,
            f"{c.location.name} has only part of the order and it may not be split",
        )  # fmt: skip
    if whole:
        floor = c.cost_cents
        how = "shipping everything from"
    else:
        # Any plan through this source also needs another source for what it
        # lacks: at least the cheapest other source of the scarcest missing line.
        missing = [i for i, n in enumerate(problem.needs) if c.supply.get(i, 0) < n.quantity]
        others = [
            min((o.cost_cents for o in cheapest_for.get(i, []) if o is not c), default=0)
            for i in missing
        ]
        floor = c.cost_cents + max(others, default=0)
        how = "a plan through"
    extra = max(0, floor - total) if planned else 0
    return Verdict(
        c.location_id, Outcome.MORE_EXPENSIVE, distance, c.cost_cents, extra,
        f"{how} {c.location.name} ({c.distance_km:.0f} km) costs at least "
        f"{money(extra)} more" if extra else
        f"{c.location.name} ({c.distance_km:.0f} km) would cost no more, but the chosen "
        "plan has fewer shipments or a higher priority",
    )  # fmt: skip


_OUTCOME_ORDER = {outcome: rank for rank, outcome in enumerate(Outcome)}


def _verdict_order(v: Verdict) -> tuple[int, int, str]:
    return (_OUTCOME_ORDER[v.outcome], v.extra_cost_cents, v.location_id)


def _summary(
    problem: Problem, shipments: Sequence[Shipment], unsourced: Sequence[Unsourced], total: int
) -> str:
    if not shipments:
        return "Nothing could be sourced: " + "; ".join(
            f"line {u.line_number}: {u.reason}" for u in unsourced
        )
    if problem.method is Method.CLICK_AND_COLLECT:
        pickup = problem.pickup_location_id
        transfers = [s for s in shipments if s.type is FulfilmentType.TRANSFER_TO_STORE]
        ready = max(s.estimated_at for s in shipments)
        text = (
            f"Collect at {pickup} from its own shelves"
            if not transfers
            else f"Collect at {pickup} after {len(transfers)} transfer(s) from "
            + ", ".join(s.source_id for s in transfers)
        )
        text += f", ready {ready:%Y-%m-%d %H:%M}"
    else:
        text = f"{len(shipments)} shipment(s) from " + ", ".join(s.source_id for s in shipments)
    text += f"; estimated cost {money(total)}"
    if unsourced:
        text += f"; {sum(u.quantity for u in unsourced)} unit(s) could not be sourced"
    return text + "."
