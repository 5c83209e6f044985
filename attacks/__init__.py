"""Attacks on intercepted updates: label recovery, analytic and optimisation-based inversion,
and the dishonest-server imprint. ``get_attack(name, **config)`` builds one by name; ground
truth enters only ``attacks.truth.leakage.evaluate``."""

from attacks.registry import ATTACK_NAMES, get_attack

__all__ = ["ATTACK_NAMES", "get_attack"]
