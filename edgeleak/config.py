"""The experiment configuration: one frozen dataclass, validated field by field."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from attacks.registry import ATTACK_NAMES
from coordinator.robust import DEFENCES, parse_defence
from devices.datasets import DATASETS
from devices.partition import SCHEMES as PARTITIONS
from devices.profiles import PROFILES
from edge import protect
from edge.backends import RUNTIMES
from edge.codec import MAX_HEADER_BYTES
from edge.poison import POISONS
from edge.wire import (
    ALGORITHMS,
    CODEC_HELP,
    MAX_DECOYS,
    MAX_MESSAGE_BYTES,
    WireError,
    check_codec,
)
from export.names import MODELS

AGGREGATORS = DEFENCES
CLOCKS = ("none", "virtual", "real")
CLOCK_BASES = ("flops", "host")
MALICIOUS = ("none", "imprint", "permute")
ENGINES = ("local", "ray")


# Fields whose values come from a registry (comma-separated lists for runtime, profiles, attack).
CHOICES: dict[str, tuple[str, ...]] = {
    "model": MODELS,
    "dataset": DATASETS,
    "partition": PARTITIONS,
    "algorithm": ALGORITHMS,
    "aggregator": AGGREGATORS,
    "runtime": RUNTIMES,
    "clock": CLOCKS,
    "clock_base": CLOCK_BASES,
    "profiles": PROFILES,
    "attack": ATTACK_NAMES,
    "malicious": MALICIOUS,
    "poison": POISONS,
    "engine": ENGINES,
}

# One line per field for ``edgeleak demo --help`` (a test checks that every field has one).
FIELD_HELP: dict[str, str] = {
    "devices": "number of emulated devices",
    "rounds": "federated rounds to run",
    "model": "zoo model the devices train",
    "dataset": "offline dataset the devices' shards come from",
    "partition": "how examples are split over devices",
    "alpha": "Dirichlet concentration (partition dirichlet; smaller is more skewed)",
    "algorithm": "fedsgd (one gradient per round) or fedavg (local epochs, weight delta)",
    "lr": "device learning rate",
    "epochs": "local epochs per round (fedavg)",
    "batch_size": "local batch size (0: the whole shard)",
    "fraction": "fraction of devices selected per round, in (0, 1]",
    "server_lr": "server learning rate applied to the aggregate",
    "aggregator": "how the coordinator combines updates, name[:key=value,...]: mean, median, "
    "trimmed_mean:beta=B, krum:f=F, multikrum:f=F,m=M, norm_bound:bound=C (0: median norm), "
    "flame:noise=L",
    "codec": "uplink encoding of updates: f32, f16, int8, int8c, topk:F, topk:F+int8 (F in (0, 1])",
    "decoys": "decoy updates per device and round, under keyed pseudonyms (0: none); an alias "
    "of --protect decoys:k=K",
    "runtime": "device runtime, or a comma-separated mix assigned round-robin",
    "clock": "none; virtual (profiles set round times, no waiting); real (devices wait)",
    "clock_base": "flops: compute = model FLOPs / profile throughput (any host alike); host: "
    "profiles scaled by this host's measured speed",
    "profiles": "comma-separated device profiles, round-robin (empty: all of them)",
    "attack": "comma-separated attacks an eavesdropper runs on the run's traffic",
    "attack_budget_s": "seconds per attack and intercepted update",
    "attack_max": "number of intercepted updates attacked",
    "attack_round": "attack updates from this round on (1: from the first; e.g. the last round "
    "to attack a trained model)",
    "attack_iterations": "> 0: iterations of optimisation attacks (0: each attack's default)",
    "malicious": "a dishonest coordinator changes the weights it ships: imprint (plants a "
    "Robbing-the-Fed imprint) or permute (only permutes each first-layer row)",
    "imprint_bins": "imprint bins (malicious imprint)",
    "malicious_devices": "fraction of devices that poison (chosen from the seed; 0: none)",
    "poison": "what malicious devices do: backdoor (trigger patch), replace (backdoor boosted by "
    "n/server_lr), flip (labels), scale, signflip (update times +/-boost)",
    "backdoor_target": "class that triggered images are relabelled to (backdoor, replace)",
    "poison_boost": "update scale of replace/scale/signflip (0: devices per round / server_lr)",
    "workers": "fleet worker processes (Ray actors with --engine ray)",
    "engine": "where the fleet's workers run: local (processes here) or ray (actors on a Ray "
    "cluster; extra 'ray')",
    "ray_address": "the Ray cluster of --engine ray: auto (started with `ray start`), HOST:PORT "
    "of its head, or local (a one-machine cluster for the run; the default)",
    "deadline_s": "seconds a round waits for updates",
    "seed": "seed of partition, initial weights and selection",
    "max_examples": "the coordinator refuses an update whose n is above this (or its status)",
    "max_epochs": "a device refuses a task with more local epochs",
    "max_batch_size": "a device refuses a task with a larger batch",
    "max_steps": "a device refuses a task costing more SGD steps (epochs x batches)",
    "protect": "client-side protections, ';'-separated: dp:clip=C,sigma=S | dpsgd:clip=C,sigma=S "
    "| central_dp:clip=C,sigma=S | distributed_dp:clip=C,sigma=S (with secagg) "
    "| dummy:m=M,source=noise|public | decoys:k=K",
    "dp_epsilon": "> 0: calibrate the DP protection's sigma to this epsilon for the whole run",
    "dp_delta": "delta of the privacy accounting and of the calibration",
    "secagg": "secure aggregation (SecAgg+): k=NEIGHBOURS (0: all),t=FRACTION,clip=C,bits=B; "
    "empty: off",
    "aggregators": "K > 0: groups of K devices answer through an edge aggregator each (0: flat)",
    "he": "CKKS: devices encrypt updates, the coordinator adds ciphertexts, a key holder "
    "process decrypts the aggregate (extra 'he')",
    "verify_model_consistency": "the coordinator announces each round's model to the whole run; "
    "devices train only on that one (a coordinator shipping devices different models, as LOKI "
    "does, is refused)",
    "max_payload_bytes": "the coordinator refuses a larger update message (oversize)",
    "max_header_bytes": "the coordinator refuses an update whose container header is larger",
    "max_devices_online": "the coordinator ignores online statuses of more devices than this "
    "(too_many_devices)",
    "max_concurrent": "pace steering: at most this many devices hold an unanswered task, the "
    "others get theirs as answers come in (0: all at once)",
}


class ConfigError(ValueError):
    """A config value outside what is allowed; the message names the field and the allowed values."""


@dataclass(frozen=True)
class ExperimentConfig:
    devices: int = 20
    rounds: int = 10
    model: str = "lenet"
    dataset: str = "fashion-mnist"
    partition: str = "iid"
    alpha: float = 0.5
    algorithm: str = "fedavg"
    lr: float = 0.1
    epochs: int = 1
    batch_size: int = 16
    fraction: float = 1.0
    server_lr: float = 1.0
    aggregator: str = "mean"
    codec: str = "f32"  # uplink: f32, f16, int8, int8c, topk:F, topk:F+int8
    decoys: int = 0  # decoy updates per device and round, under keyed pseudonyms (edge.decoy)
    runtime: str = "onnx"  # one runtime, or a comma-separated mix assigned round-robin
    clock: str = (
        "none"  # none | virtual (profiles drive deadlines, no waiting) | real (devices wait)
    )
    clock_base: str = "flops"  # flops: model FLOPs / profile throughput | host: scaled to this host
    profiles: str = ""  # comma-separated device profiles, round-robin; empty: all of them
    attack: str = ""  # comma-separated attacks run by an eavesdropper on the run's traffic
    attack_budget_s: float = 30.0  # seconds per attack and update
    attack_max: int = 4  # intercepted updates attacked
    attack_round: int = 1  # attack updates from this round on
    attack_iterations: int = 0  # > 0: iterations of optimisation attacks (0: their default)
    malicious: str = (
        "none"  # none | imprint | permute: what a dishonest coordinator does to the weights
    )
    imprint_bins: int = 128
    malicious_devices: float = 0.0  # fraction of poisoning devices (edge.poison), from the seed
    poison: str = "backdoor"  # backdoor | replace | flip | scale | signflip
    backdoor_target: int = 0  # the backdoor's target class
    poison_boost: float = 0.0  # 0: Bagdasaryan's n/η (devices per round over server_lr)
    workers: int = 2
    engine: str = "local"  # local | ray (devices.ray_fleet)
    ray_address: str = ""  # engine ray: auto | HOST:PORT | local ("": local)
    deadline_s: float = 120.0
    seed: int = 0
    # Limits against hostile messages: the coordinator refuses an update whose n is above this
    # (or above what its device announced); a device refuses a task above its limits.
    max_examples: int = 100_000
    max_epochs: int = 10
    max_batch_size: int = 1024
    max_steps: int = 10_000  # SGD steps one task may cost a device
    # client-side protections, ";"-separated edge.protect specs (e.g. "dp:clip=1,sigma=0.8")
    protect: str = ""
    dp_epsilon: float = 0.0  # > 0: calibrate the DP protection's sigma to this ε for the run
    dp_delta: float = 1e-5  # δ of the accounting (and of the calibration)
    secagg: str = ""  # secure aggregation, edge.secagg spec (e.g. "k=0,t=0.5,clip=1,bits=16")
    aggregators: int = 0  # K > 0: groups of K devices behind one edge aggregator each
    he: bool = False  # CKKS updates, added without the secret key (edge.he, coordinator.he)
    # devices train only on the model the coordinator announced to the whole run (LOKI check)
    verify_model_consistency: bool = False
    # Size limits of the coordinator (README "Reliability"): message and header bytes, and how
    # many devices may be online in a run (floods of phantom statuses stop there).
    max_payload_bytes: int = MAX_MESSAGE_BYTES
    max_header_bytes: int = MAX_HEADER_BYTES
    max_devices_online: int = 20_000
    max_concurrent: int = 1000  # tasks out and unanswered at once (0: no limit)

    def __post_init__(self) -> None:
        _choice("model", self.model, MODELS)
        _choice("dataset", self.dataset, DATASETS)
        _choice("partition", self.partition, PARTITIONS)
        _choice("algorithm", self.algorithm, ALGORITHMS)
        try:
            parse_defence(self.aggregator)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        try:
            check_codec(self.codec)
        except WireError:
            raise ConfigError(f"codec={self.codec!r}: expected {CODEC_HELP}") from None
        if not isinstance(self.decoys, int) or not 0 <= self.decoys <= MAX_DECOYS:
            raise ConfigError(f"decoys={self.decoys!r}: expected an integer in 0..{MAX_DECOYS}")
        for r in self.runtimes:
            _choice("runtime", r, RUNTIMES)
        _choice("clock", self.clock, CLOCKS)
        _choice("clock_base", self.clock_base, CLOCK_BASES)
        for name in self.profile_names:
            _choice("profiles", name, PROFILES)
        for name in self.attacks:
            _choice("attack", name, ATTACK_NAMES)
        _positive("attack_budget_s", self.attack_budget_s)
        _at_least("attack_max", self.attack_max, 1)
        _at_least("attack_round", self.attack_round, 1)
        if self.attack_round > self.rounds:
            raise ConfigError(
                f"attack_round={self.attack_round} is after the last round (rounds={self.rounds})"
            )
        _at_least("attack_iterations", self.attack_iterations, 0)
        _choice("malicious", self.malicious, MALICIOUS)
        _at_least("imprint_bins", self.imprint_bins, 1)
        self._check_poison()
        if self.malicious != "none" and (self.model, self.algorithm) != ("mlp", "fedsgd"):
            raise ConfigError(
                f"malicious={self.malicious!r} rewrites a first linear layer and reads one batch "
                "gradient: it needs model='mlp' and algorithm='fedsgd'"
            )
        _at_least("devices", self.devices, 1)
        _at_least("rounds", self.rounds, 1)
        _at_least("epochs", self.epochs, 1)
        _at_least("batch_size", self.batch_size, 0)
        _at_least("workers", self.workers, 1)
        _at_least("max_examples", self.max_examples, 1)
        _at_least("max_epochs", self.max_epochs, 1)
        _at_least("max_batch_size", self.max_batch_size, 1)
        _at_least("max_steps", self.max_steps, 1)
        _at_least("max_payload_bytes", self.max_payload_bytes, 64)
        _at_least("max_header_bytes", self.max_header_bytes, 8)
        _at_least("max_devices_online", self.max_devices_online, 1)
        _at_least("max_concurrent", self.max_concurrent, 0)
        if self.epochs > self.max_epochs:
            raise ConfigError(f"epochs={self.epochs} is above max_epochs={self.max_epochs}")
        if self.batch_size > self.max_batch_size:
            raise ConfigError(
                f"batch_size={self.batch_size} is above max_batch_size={self.max_batch_size}"
            )
        _positive("lr", self.lr)
        _positive("server_lr", self.server_lr)
        _positive("alpha", self.alpha)
        _positive("deadline_s", self.deadline_s)
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"fraction={self.fraction!r}: expected a number in (0, 1]")
        self._check_protect()
        if self.secagg:
            from coordinator.secagg import check_plan

            try:
                check_plan(self.secagg, decoys=self.decoys, codec=self.codec,
                           aggregator=self.aggregator, protect=self.protect)  # fmt: skip
            except ValueError as e:
                raise ConfigError(f"secagg={self.secagg!r}: {e}") from None
        self._check_server_side()

    def _check_poison(self) -> None:
        m = self.malicious_devices
        if not isinstance(m, int | float) or isinstance(m, bool) or not 0 <= m < 1:
            raise ConfigError(
                f"malicious_devices={self.malicious_devices!r}: expected a fraction in [0, 1)"
            )
        _choice("poison", self.poison, POISONS)
        _at_least("backdoor_target", self.backdoor_target, 0)
        b = self.poison_boost
        if not isinstance(b, int | float) or isinstance(b, bool) or not b >= 0:
            raise ConfigError(f"poison_boost={self.poison_boost!r}: expected a number >= 0")

    def _check_server_side(self) -> None:
        _at_least("aggregators", self.aggregators, 0)
        for f in fields(self):
            if f.type == "bool" and not isinstance(getattr(self, f.name), bool):
                raise ConfigError(f"{f.name}={getattr(self, f.name)!r}: expected true or false")
        if self.aggregators and (self.decoys or self.clock != "none" or self.he):
            raise ConfigError(
                "aggregators: groups answer as one client; not with decoys, a clock or he"
            )
        if self.he and (self.aggregator != "mean" or self.decoys or protect.dp_step(
            protect.parse(self.protect)) is not None):  # fmt: skip
            raise ConfigError("he adds ciphertexts: aggregator 'mean', no decoys, no DP")
        _choice("engine", self.engine, ENGINES)
        if self.ray_address and self.engine != "ray":
            raise ConfigError(f"ray_address={self.ray_address!r} is for engine 'ray'")
        if self.engine == "ray" and importlib.util.find_spec("ray") is None:
            raise ConfigError("engine ray needs Ray: pip install 'edgeleak[ray]'")
        if self.engine == "ray" and self.aggregators:
            raise ConfigError("engine ray: edge aggregators (aggregators > 0) run locally only")
        if self.secagg and (self.he or self.aggregators):
            raise ConfigError(
                "secagg: one server-side protection at a time, not with he or aggregators"
            )

    def _check_protect(self) -> None:
        try:
            # decoys=K is an alias of the protection decoys:k=K: fold it in, keep both in step
            spec = protect.with_decoys(self.protect, self.decoys)
            steps = protect.parse(spec)
        except protect.ProtectError as e:
            raise ConfigError(f"protect={self.protect!r}: {e}") from None
        object.__setattr__(self, "protect", spec)
        object.__setattr__(self, "decoys", protect.decoy_count(steps))
        dp = protect.dp_step(steps)
        if not 0 < self.dp_delta < 1:
            raise ConfigError(f"dp_delta={self.dp_delta!r}: expected a number in (0, 1)")
        if self.dp_epsilon < 0:
            raise ConfigError(f"dp_epsilon={self.dp_epsilon!r}: expected a number >= 0")
        if self.dp_epsilon > 0 and dp is None:
            raise ConfigError(
                "dp_epsilon calibrates the sigma of a DP protection: add one, e.g. "
                "--protect dp:clip=1 (or dpsgd:clip=1, central_dp:clip=1)"
            )
        if dp is not None and self.dp_epsilon > 0 and dp.sigma is not None:
            raise ConfigError(
                f"{dp.name}: give sigma or --dp-epsilon, not both (sigma={dp.sigma} "
                f"and dp_epsilon={self.dp_epsilon})"
            )
        if dp is not None and self.dp_epsilon == 0 and dp.sigma is None:
            raise ConfigError(
                f"{dp.name}: no sigma; give {dp.name}:clip={dp.clip},sigma=S or --dp-epsilon E"
            )
        try:
            protect.require_secagg(steps, secagg=bool(self.secagg))
        except protect.ProtectError as e:
            raise ConfigError(f"protect={self.protect!r}: {e}") from None
        if isinstance(dp, protect.DistributedDP) and dp.shares is not None:
            raise ConfigError(
                f"distributed_dp: shares={dp.shares} is set by the coordinator in every round "
                "(the round's selected devices); leave it out"
            )
        if isinstance(dp, protect.CentralDP) and self.aggregator != "mean":
            raise ConfigError(
                f"central_dp adds its noise to the mean: aggregator must be 'mean', "
                f"not {self.aggregator!r}"
            )

    @property
    def runtimes(self) -> list[str]:
        return [r.strip() for r in self.runtime.split(",")]

    @property
    def attacks(self) -> list[str]:
        return [a.strip() for a in self.attack.split(",") if a.strip()]

    @property
    def profile_names(self) -> list[str]:
        return [p.strip() for p in self.profiles.split(",") if p.strip()] or list(PROFILES)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExperimentConfig:
        valid = {f.name: f.type for f in fields(cls)}
        unknown = sorted(set(d) - set(valid))
        if unknown:
            raise ConfigError(
                f"unknown config field(s) {unknown}; valid fields: {', '.join(valid)}"
            )
        defaults = cls()
        typed: dict[str, Any] = {}
        for k, v in d.items():
            if k == "protect" and isinstance(v, list) and all(isinstance(p, str) for p in v):
                v = ";".join(v)  # a list of specs, one per protection
            want = type(getattr(defaults, k))
            if want is float and isinstance(v, int) and not isinstance(v, bool):
                v = float(v)
            if not isinstance(v, want) or (isinstance(v, bool) and want is not bool):
                raise ConfigError(f"{k}={v!r}: expected type {want.__name__}")
            typed[k] = v
        return cls(**typed)

    @classmethod
    def from_file(cls, path: str | Path) -> ExperimentConfig:
        try:
            d = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not JSON ({e})") from None
        except (OSError, UnicodeDecodeError) as e:
            why = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
            raise ConfigError(f"{path}: cannot read it ({why}); expected a JSON file") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a JSON object of config fields")
        return cls.from_dict(d)


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r}: expected one of {', '.join(allowed)}")


def _at_least(name: str, value: object, lo: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < lo:
        raise ConfigError(f"{name}={value!r}: expected an integer >= {lo}")


def _positive(name: str, value: object) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
        raise ConfigError(f"{name}={value!r}: expected a number > 0")
