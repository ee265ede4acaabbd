"""Reward functions given by module path in the tests (a user's own module, shipped with the job)."""


def always_one(response: str, answer) -> float:
    return 1.0


def never(response: str, answer) -> float:
    return 0.0


def half_if_nonempty(response: str, answer) -> float:
    return 0.5 if response else 0.0
