"""Row specs: which mixtures (and soups) an evaluation compares.

A ``--rows`` value is a comma-separated list of specs::

    reference                 the reference alone (strength 0)
    uniform                   equal weights, strength 1
    single                    one row per policy (``policy:<name>`` each)
    policy:<name>             that policy alone
    weights:a=1,b=2[@s]       explicit weights (normalised), optional strength s
    profile:<name>[@s]        a stored profile (``fitted:<name>`` is the same)
    fitted                    the weights an MPO fit finds in this run (needs fit prompts)
    fitted:rewards            the weights (and strength) a fit to the rewards finds in this
                              run (``mpo_core.reward_fit_driver``); a stored profile named
                              "rewards" is ``profile:rewards``
    soup[:<source>]           the parameter average of the policies at the weights of
                              <source>: ``fitted``, ``uniform``, ``profile:<name>``,
                              ``a=1,b=2``; bare ``soup`` takes the first fitted or profile
                              row's weights, else uniform

Inside ``weights:`` and ``soup:``, the ``name=value`` pieces after a comma belong to
the same spec, so ``weights:a=1,b=2,uniform`` is two rows.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..decoding.mixing import Mixture, check_strength
from ..errors import InvalidParameter

# A stored profile's (weights, strength), looked up by name (the CLI passes the store's).
ProfileLookup = Callable[[str], tuple[dict[str, float], float]]

_PAIR = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*=")
_STORED = ("fitted:", "profile:")
ROW_GRAMMAR = (
    "reference, uniform, single, policy:NAME, weights:NAME=W,...[@S], profile:NAME[@S], "
    "fitted:NAME, fitted, fitted:rewards, soup[:fitted|uniform|profile:NAME|NAME=W,...]"
)
REWARD_FIT_ROW = "fitted:rewards"


@dataclass(frozen=True)
class Row:
    """One compared row: a mixture decoded by the engine, or a soup served as one model."""

    label: str  # unique within an evaluation, e.g. "policy:polite", "soup@fitted"
    kind: str  # "mixture" or "soup"
    names: tuple[str, ...]  # the policies, in order
    weights: tuple[float, ...]  # [K] on the simplex
    strength: float = 1.0  # mixtures only; a soup is one model

    @property
    def key(self) -> tuple[str, tuple[float, ...], float]:
        """Rows with one key decode the same thing (rounded so float noise does not split)."""
        return (self.kind, tuple(round(w, 9) for w in self.weights), self.strength)

    def weights_dict(self) -> dict[str, float]:
        return dict(zip(self.names, self.weights))


def split_specs(values: Sequence[str]) -> list[str]:
    """Split ``--rows`` values on commas, keeping ``name=value`` pieces with their spec."""
    specs: list[str] = []
    for value in values:
        for piece in (p.strip() for p in value.split(",")):
            if not piece:
                continue
            continues = specs and specs[-1].startswith(("weights:", "soup:"))
            if continues and _PAIR.match(piece):
                specs[-1] += "," + piece
            else:
                specs.append(piece)
    return specs


def _bad(spec: str, why: str) -> InvalidParameter:
    return InvalidParameter("rows", f"bad row spec {spec!r}: {why}; rows are: {ROW_GRAMMAR}")


def _parse_pairs(spec: str, body: str, names: Sequence[str]) -> dict[str, float]:
    weights: dict[str, float] = {}
    for pair in body.split(","):
        name, sep, value = pair.partition("=")
        if not sep:
            raise _bad(spec, f"{pair!r} is not NAME=WEIGHT")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            raise _bad(spec, f"weight {value!r} of {name!r} is not a number") from None
    unknown = [n for n in weights if n not in names]
    if unknown:
        raise _bad(spec, f"unknown policy {unknown[0]!r} (policies: {', '.join(names)})")
    return weights


def _split_strength(spec: str, body: str) -> tuple[str, float | None]:
    if "@" not in body:
        return body, None
    body, _, raw = body.rpartition("@")
    try:
        return body, float(raw)
    except ValueError:
        raise _bad(spec, f"strength {raw!r} is not a number") from None


class RowParser:
    """Turns specs into rows for one policy set; ``fitted`` and profiles come from outside."""

    def __init__(
        self,
        names: Sequence[str],
        has_reference: bool,
        profiles: ProfileLookup | None = None,
        fitted: dict[str, float] | None = None,
        reward_fitted: tuple[dict[str, float], float] | None = None,
    ) -> None:
        self.names = tuple(names)
        self.has_reference = has_reference
        self.profiles = profiles
        self.fitted = fitted
        self.reward_fitted = reward_fitted  # (weights, strength) of this run's reward fit

    def mixture_row(self, label: str, weights: object, strength: object = 1.0) -> Row:
        mixture = Mixture.build(self.names, weights, strength, has_reference=self.has_reference)  # type: ignore[arg-type]
        return Row(label, "mixture", self.names, mixture.weights, mixture.strength)

    def _profile(self, spec: str, name: str) -> tuple[dict[str, float], float]:
        if self.profiles is None:
            raise _bad(spec, "profile rows need a profile store")
        return self.profiles(name)

    def _fitted(self, spec: str) -> dict[str, float]:
        if self.fitted is None:
            raise _bad(spec, "no fit in this run: give fit prompts (--fit-prompts) or --demo")
        return self.fitted

    def parse(self, specs: Sequence[str]) -> list[Row]:
        """Rows for ``specs`` in order, without duplicates (by label)."""
        rows: list[Row] = []
        for spec in specs:
            rows += self._parse_one(spec, rows)
        unique: dict[str, Row] = {}
        for row in rows:
            unique.setdefault(row.label, row)
        if not unique:
            raise InvalidParameter("rows", f"no rows given; rows are: {ROW_GRAMMAR}")
        return list(unique.values())

    def _parse_one(self, spec: str, earlier: list[Row]) -> list[Row]:
        head, _, body = spec.partition(":")
        if spec == "reference":
            if not self.has_reference:
                raise _bad(spec, "this policy set has no reference model")
            return [self.mixture_row("reference", None, 0.0)]
        if spec == "uniform":
            return [self.mixture_row("uniform", None)]
        if spec == "single":
            return [self.mixture_row(f"policy:{n}", {n: 1.0}) for n in self.names]
        if spec == "fitted":
            return [self.mixture_row("fitted", self._fitted(spec))]
        if spec == REWARD_FIT_ROW:
            if self.reward_fitted is None:
                raise _bad(
                    spec, "no reward fit in this run: give fit prompts and --rewards, or --demo"
                )
            return [self.mixture_row(spec, *self.reward_fitted)]
        if head == "policy" and body:
            if body not in self.names:
                raise _bad(spec, f"unknown policy {body!r} (policies: {', '.join(self.names)})")
            return [self.mixture_row(spec, {body: 1.0})]
        if head == "weights" and body:
            pairs, strength = _split_strength(spec, body)
            weights = _parse_pairs(spec, pairs, self.names)
            return [self.mixture_row(spec, weights, 1.0 if strength is None else strength)]
        if head in ("profile", "fitted") and body:
            name, strength = _split_strength(spec, body)
            weights, stored_strength = self._profile(spec, name)
            check_strength(strength if strength is not None else stored_strength, True)
            return [
                self.mixture_row(spec, weights, stored_strength if strength is None else strength)
            ]
        if head == "soup":
            return [self._soup(spec, body, earlier)]
        raise _bad(spec, "unknown row")

    def _soup(self, spec: str, body: str, earlier: list[Row]) -> Row:
        if "@" in body:
            raise _bad(spec, "a soup is one model: it takes no strength")
        if not body:
            source = next(
                (r for r in earlier if r.label == "fitted" or r.label.startswith(_STORED)), None
            )
            if source is None:
                return self.soup_row("soup@uniform", None)
            return self.soup_row(f"soup@{source.label}", source.weights_dict())
        if body == "uniform":
            weights: object = None
        elif body == "fitted":
            weights = self._fitted(spec)
        elif body.startswith(("profile:", "fitted:")):
            weights = self._profile(spec, body.partition(":")[2])[0]
        elif body.startswith("weights:"):
            weights = _parse_pairs(spec, body[len("weights:") :], self.names)
        else:
            weights = _parse_pairs(spec, body, self.names)
        return self.soup_row(f"soup@{body}", weights)

    def soup_row(self, label: str, weights: object) -> Row:
        return Row(label, "soup", self.names, self.mixture_row(label, weights).weights)


def sweep_rows(names: Sequence[str], first: str, second: str, points: int) -> list[Row]:
    """``points`` mixtures and soups from ``first`` alone to ``second`` alone."""
    if points < 2:
        raise InvalidParameter("pareto_points", f"pareto_points must be >= 2, got {points}")
    rows = []
    for i in range(points):
        t = i / (points - 1)
        weights = tuple((1 - t) if n == first else t if n == second else 0.0 for n in names)
        label = f"{first}={1 - t:.2f},{second}={t:.2f}"
        rows.append(Row(f"mix:{label}", "mixture", tuple(names), weights, 1.0))
        rows.append(Row(f"soup:{label}", "soup", tuple(names), weights))
    return rows
