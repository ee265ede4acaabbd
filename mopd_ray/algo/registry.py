"""Name -> function registries, so a config chooses an estimator or loss by name.

An unknown name fails with the list of valid ones (the error a user sees on a typo in the config).
"""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

F = TypeVar("F", bound=Callable)


class Registry(Generic[F]):
    """A small named registry of functions of one kind (e.g. "advantage estimator")."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._fns: dict[str, F] = {}

    def register(self, name: str) -> Callable[[F], F]:
        def deco(fn: F) -> F:
            if name in self._fns:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._fns[name] = fn
            return fn

        return deco

    def get(self, name: str) -> F:
        try:
            return self._fns[name]
        except KeyError:
            raise KeyError(
                f"unknown {self.kind} {name!r}; valid names: {', '.join(sorted(self._fns))}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._fns)

    def __contains__(self, name: object) -> bool:
        return name in self._fns


ADVANTAGE_ESTIMATORS: Registry = Registry("advantage estimator")
OUTCOME_ESTIMATORS: Registry = Registry("outcome advantage estimator")
POLICY_LOSSES: Registry = Registry("policy loss")
LOSS_AGGREGATIONS: Registry = Registry("loss aggregation")
IS_CORRECTIONS: Registry = Registry("importance-sampling correction")
DISTILL_LOSSES: Registry = Registry("distillation loss")
KL_ESTIMATORS: Registry = Registry("KL estimator")
