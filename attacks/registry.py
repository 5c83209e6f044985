"""Attacks by name. Modules load on first use, so importing the registry needs no torch."""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from attacks.base import Attack

# name -> (module, attack class, config class)
_ATTACKS: dict[str, tuple[str, str, str]] = {
    "idlg": ("attacks.labels", "IDLG", "IDLGConfig"),
    "label_count": ("attacks.labels", "LabelCount", "LabelCountConfig"),
    "analytic": ("attacks.analytic", "AnalyticAttack", "AnalyticConfig"),
    "dlg": ("attacks.inversion", "DLG", "DLGConfig"),
    "inverting_gradients": ("attacks.inversion", "InvertingGradients", "IGConfig"),
    "fedavg": ("attacks.inversion", "FedAvgInversion", "FedAvgConfig"),
    "imprint": ("attacks.imprint", "ImprintAttack", "ImprintConfig"),
    "spear": ("attacks.spear", "Spear", "SpearConfig"),
    "ilrg": ("attacks.ilrg", "ILRG", "ILRGConfig"),
    "words": ("attacks.text", "KeyboardLeak", "WordsConfig"),
}
ATTACK_NAMES: tuple[str, ...] = tuple(_ATTACKS)


def config_class(name: str) -> type:
    """The frozen config dataclass of attack ``name``."""
    module, _, config = _entry(name)
    cls: type = getattr(importlib.import_module(module), config)
    return cls


def get_attack(name: str, **config: Any) -> Attack:
    """A configured attack; ``config`` fills its config dataclass (unknown keys are an error)."""
    module, cls, _ = _entry(name)
    cfg_cls = config_class(name)
    fields = {f.name for f in dataclasses.fields(cfg_cls)}
    unknown = sorted(set(config) - fields)
    if unknown:
        raise TypeError(
            f"attack {name!r} has no setting {', '.join(unknown)}; "
            f"its settings are: {', '.join(sorted(fields)) or 'none'}"
        )
    attack: Attack = getattr(importlib.import_module(module), cls)(cfg_cls(**config))
    return attack


def _entry(name: str) -> tuple[str, str, str]:
    if name not in _ATTACKS:
        raise ValueError(f"unknown attack {name!r}; expected one of {', '.join(ATTACK_NAMES)}")
    return _ATTACKS[name]
