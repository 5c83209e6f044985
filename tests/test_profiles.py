"""Device profiles: the round-time model and the provenance of every number."""

from __future__ import annotations

import json
from importlib import resources

import pytest

from devices.profiles import (
    HOURS,
    NUMBERS,
    PROFILES,
    DeviceProfile,
    Source,
    _parse,
    all_profiles,
    compute_seconds,
    load_profile,
    round_time,
)


def test_round_time_exact_on_a_known_profile() -> None:
    p = load_profile("rpi4")
    assert (p.train_gflops, p.downlink_mbps, p.uplink_mbps, p.rtt_ms) == (0.641, 93.9, 45.0, 10.0)
    t = round_time(
        p, examples=100, bytes_down=1_000_000, bytes_up=500_000, flops_per_example=2_499_120
    )
    # 100 * 2,499,120 / 0.641e9 + 8e6 / 93.9e6 + 4e6 / 45e6 + 0.010
    want = 0.38987831513260530 + 0.08519701810436635 + 0.08888888888888889 + 0.01
    assert t == pytest.approx(want, abs=1e-12)


def test_round_time_terms() -> None:
    p = DeviceProfile("t", "", 2.0, 1024, 8.0, 4.0, 50.0, (1.0,) * HOURS, {})

    def rt(examples: int = 0, down: int = 0, up: int = 0, flops: float = 1.0) -> float:
        return round_time(
            p, examples=examples, bytes_down=down, bytes_up=up, flops_per_example=flops
        )

    assert rt() == pytest.approx(0.05, abs=1e-15)  # RTT only
    assert rt(down=1_000_000) == pytest.approx(1.05, abs=1e-12)  # 8 Mbit at 8 Mbit/s
    assert rt(up=1_000_000) == pytest.approx(2.05, abs=1e-12)  # 8 Mbit at 4 Mbit/s
    assert rt(examples=10, flops=1e8) == pytest.approx(0.55, abs=1e-12)  # 1e9 FLOPs at 2 GFLOP/s
    assert compute_seconds(p, examples=10, flops_per_example=1e8, speed_scale=4.0) == 0.125
    with pytest.raises(ValueError, match=">= 0"):
        rt(up=-1)
    with pytest.raises(ValueError, match="flops_per_example > 0"):
        rt(flops=0.0)


def test_every_profile_has_sources() -> None:
    profiles = all_profiles()
    assert set(profiles) == set(PROFILES)
    for name, p in profiles.items():
        assert set(p.sources) == {*NUMBERS, "availability"}, name
        for key, src in p.sources.items():
            assert isinstance(src, Source) and len(src.text) > 20, (name, key)
        assert len(p.availability) == HOURS and 0 < p.mean_availability <= 1
        # Where a number is flagged as an estimate, the text says so too (or names a derivation).
        for key, src in p.sources.items():
            if src.estimate:
                assert "stimate" in src.text or "Ratio" in src.text, (name, key)


def test_profile_files_match_registry() -> None:
    folder = resources.files("devices").joinpath("profiles")
    files = {f.name.removesuffix(".json") for f in folder.iterdir() if f.name.endswith(".json")}
    assert files == set(PROFILES)


def test_tiers_are_ordered() -> None:
    p = all_profiles()
    assert p["phone-low"].train_gflops < p["phone-mid"].train_gflops < p["phone-high"].train_gflops
    assert p["rpi3b"].train_gflops < p["rpi4"].train_gflops < p["rpi5"].train_gflops
    assert p["rpi3b"].memory_mb < p["rpi4"].memory_mb < p["rpi5"].memory_mb


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="rpi4") as e:
        load_profile("rpi6")
    assert all(n in str(e.value) for n in PROFILES)


def test_parse_rejects_missing_source() -> None:
    d = json.loads(resources.files("devices").joinpath("profiles", "rpi5.json").read_text())
    d["rtt_ms"]["source"] = ""
    with pytest.raises(ValueError, match="'rtt_ms' needs a 'source'"):
        _parse("rpi5", d)
    d = json.loads(resources.files("devices").joinpath("profiles", "rpi5.json").read_text())
    d["availability"]["hourly"] = [0.5] * 23
    with pytest.raises(ValueError, match="24 probabilities"):
        _parse("rpi5", d)
