"""Fan-out: one request, one choice per mixture (``mixtures``), on both APIs.

``mixtures`` is a list (choice i decodes under mixture i: a ``MixtureSpec`` or a stored
profile's name, each resolved as a request's own mixing fields would be) or ``"each"``
(one choice per policy alone, then per persona the request brings alone, then the
request's own blend). Every choice shares the
request's sampling parameters and seed, so with a seed choice i is token for token the
reply of a separate request with mixture i and that seed.
"""

from __future__ import annotations

from mpo_core.errors import InvalidParameter, UnknownProfile

from .errors import APIError
from .protocol.common import MixingFields, Mixtures, MixtureSpec
from .serving import ResolvedMixture, Serving

MIXING_FIELDS = ("weights", "profile", "strength", "plausibility", "personas")


def fanout_size(serving: Serving, mixtures: Mixtures, param: str, personas: int = 0) -> int:
    """How many choices ``mixtures`` asks for (at most the server's max_n); ``personas``:
    how many the request brings (``"each"`` runs each alone too)."""
    assert mixtures is not None
    each = len(serving.engine.policy_names) + personas + 1
    count = each if mixtures == "each" else len(mixtures)
    limit = serving.settings.max_n
    if count > limit:
        raise InvalidParameter(
            param, f"with mixtures a request has at most {limit} choices (max_n), got {count}"
        )
    return count


async def resolve_mixtures(
    serving: Serving,
    fields: MixingFields,
    mixtures: Mixtures,
    param: str,
    blend: ResolvedMixture | None,
) -> list[ResolvedMixture]:
    """Each choice's mixture, in choice order. ``blend`` is the request's own (for
    ``"each"``); a list of mixtures takes none of the request's mixing fields."""
    assert mixtures is not None
    if mixtures == "each":
        assert blend is not None
        engine = serving.engine
        alone = [ResolvedMixture(engine.mixture({n: 1.0}, 1.0), None) for n in engine.policy_names]
        for persona in blend.mixture.request_personas:  # each persona the request brings
            own = engine.mixture({persona.name: 1.0}, 1.0, personas={persona.name: persona.wire()})
            alone.append(ResolvedMixture(own, None))
        return [*alone, blend]
    given = [f for f in MIXING_FIELDS if getattr(fields, f) is not None]
    if given:
        raise InvalidParameter(
            given[0],
            f"{given[0]} cannot be combined with a list of mixtures; give each mixture its "
            "own (with mixtures)",
        )
    resolved = []
    for i, item in enumerate(mixtures):
        spec = MixtureSpec(profile=item) if isinstance(item, str) else item
        at = f"{param}.{i}"
        try:
            resolved.append(await serving.resolve_mixing(spec))
        except InvalidParameter as exc:
            raise InvalidParameter(f"{at}.{exc.param}", f"{at}: {exc.message}") from None
        except UnknownProfile as exc:
            raise APIError(404, f"{at}: {exc}", param=at, code="profile_not_found") from None
    return resolved


def check_n(
    serving: Serving, n: int, n_given: bool, mixtures: Mixtures, param: str, personas: int = 0
) -> int:
    """The number of choices: n, or with mixtures their count (n, if given, must agree)."""
    if mixtures is None:
        return serving.check_n(n)
    count = fanout_size(serving, mixtures, param, personas)
    if n_given and n != count:
        raise InvalidParameter(
            "n", f"n must equal the number of choices with mixtures ({count}) or be left out"
        )
    return count
