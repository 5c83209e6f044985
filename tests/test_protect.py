"""Client-side protections: the spec parser, DP-SGD across runtimes and against Opacus, the
accountant against Opacus, σ calibration, update-level DP on the wire, central DP exactly."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest

from coordinator.accounting import (
    calibrate_sigma,
    distributed_sigma,
    epsilon,
    round_event,
    run_epsilon,
)
from coordinator.aggregate import central_dp_mean
from devices.datasets import load_dataset
from edge import protect, wire
from edge.backends import load_backend
from edge.device import Device
from edge.manifest import ModelArtifact
from edge.mqtt import Received
from edge.train import device_rng, minibatches
from edgeleak.config import ConfigError, ExperimentConfig
from edgeleak.experiment import calibrate_protect

# -- the spec ------------------------------------------------------------------------------------


def test_parse_orders_by_stage_and_formats_back() -> None:
    steps = protect.parse("dp:clip=1,sigma=0.8; dummy:4")
    assert steps == (protect.Dummy(m=4), protect.DP(clip=1.0, sigma=0.8))
    assert protect.format_spec(steps) == "dummy:m=4,source=noise;dp:clip=1.0,sigma=0.8"
    assert protect.parse(protect.format_spec(steps)) == steps
    assert json.loads(protect.defence_json(steps)) == {
        "protect": [
            {"name": "dummy", "m": 4, "source": "noise"},
            {"name": "dp", "clip": 1.0, "sigma": 0.8},
        ]
    }
    assert protect.defence_json(()) == "{}"
    assert protect.parse("") == ()


@pytest.mark.parametrize(
    "spec, message",
    [
        (
            "laplace:b=1",
            "unknown protection 'laplace'; expected one of dp, dpsgd, central_dp, distributed_dp, dummy",
        ),
        ("dp:clip=1,eps=2", "dp: unknown parameter 'eps'; expected clip, sigma"),
        ("dp:sigma=1", "dp: missing clip (e.g. dp:clip=1)"),
        ("dp:clip=-1,sigma=1", "dp: clip=-1.0; expected a number > 0"),
        ("dp:clip=x", "dp: clip='x'; expected float"),
        ("dummy:m=0", "dummy: m=0; expected an integer >= 1"),
        ("dummy:m=2,source=web", "dummy: source='web'; expected one of noise, public"),
        ("dp:clip=1,sigma=1;dpsgd:clip=1,sigma=1", "dp and dpsgd: at most one DP protection"),
        ("dummy:1;dummy:2", "protection 'dummy' given twice"),
        ("distributed_dp:clip=1,sigma=1,shares=0", "distributed_dp: shares=0; expected an integer"),
        ("central_dp:clip=1,sigma=1;distributed_dp:clip=1", "at most one DP protection"),
    ],
)
def test_parse_errors_name_what_is_valid(spec: str, message: str) -> None:
    with pytest.raises(protect.ProtectError) as e:
        protect.parse(spec)
    assert message in str(e.value)


def test_config_checks_protect() -> None:
    with pytest.raises(ConfigError, match="dp: no sigma; give dp:clip=1.0,sigma=S or --dp-epsilon"):
        ExperimentConfig(protect="dp:clip=1")
    with pytest.raises(ConfigError, match="give sigma or --dp-epsilon, not both"):
        ExperimentConfig(protect="dp:clip=1,sigma=1", dp_epsilon=2.0)
    with pytest.raises(ConfigError, match="dp_epsilon calibrates the sigma of a DP protection"):
        ExperimentConfig(dp_epsilon=2.0)
    with pytest.raises(ConfigError, match="aggregator must be 'mean', not 'median'"):
        ExperimentConfig(protect="central_dp:clip=1,sigma=1", aggregator="median")
    cfg = ExperimentConfig.from_dict({"protect": ["dp:clip=1,sigma=2", "dummy:m=1"]})
    assert cfg.protect == "dp:clip=1,sigma=2;dummy:m=1"
    with pytest.raises(ConfigError, match="distributed_dp needs secagg"):
        ExperimentConfig(protect="distributed_dp:clip=1,sigma=1")
    with pytest.raises(ConfigError, match="shares=4 is set by the coordinator"):
        ExperimentConfig(protect="distributed_dp:clip=1,sigma=1,shares=4", secagg="k=0")
    with pytest.raises(ConfigError, match="let the devices add the noise with distributed_dp"):
        ExperimentConfig(protect="central_dp:clip=1,sigma=1", secagg="k=0")
    with pytest.raises(ConfigError, match="secagg clip=0.5 is below distributed_dp clip=1"):
        ExperimentConfig(protect="distributed_dp:clip=1,sigma=1", secagg="k=0,clip=0.5")
    for spec in (
        "distributed_dp:clip=1,sigma=1",
        "dp:clip=1,sigma=1;dummy:m=2",
        "dpsgd:clip=1,sigma=1",
    ):
        assert ExperimentConfig(protect=spec, secagg="k=0").secagg == "k=0"


def test_with_shares_sets_the_noise_split_of_distributed_dp_only() -> None:
    spec = "dummy:m=2;distributed_dp:clip=0.5,sigma=2"
    (dummy, ddp) = protect.parse(protect.with_shares(spec, 7))
    assert ddp == protect.DistributedDP(clip=0.5, sigma=2.0, shares=7) and isinstance(
        dummy, protect.Dummy
    )
    assert protect.device_noise_std(ddp) == 2.0 * 0.5 / math.sqrt(7)
    assert protect.with_shares("dp:clip=1,sigma=1", 7) == "dp:clip=1,sigma=1"
    with pytest.raises(protect.ProtectError, match="needs secagg"):
        protect.check_task(protect.parse(protect.with_shares(spec, 7)), secagg=False)
    with pytest.raises(protect.ProtectError, match="shares is not set"):
        protect.check_task(protect.parse(spec), secagg=True)
    protect.check_task(protect.parse(protect.with_shares(spec, 7)), secagg=True)


# -- DP-SGD: per-example gradients ---------------------------------------------------------------


@pytest.fixture(scope="module")
def batch() -> tuple[np.ndarray, np.ndarray]:
    data = load_dataset("fashion-mnist")
    return data.x_train[:40], data.y_train[:40]


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_per_example_grads_equal_opacus(
    lenet_artifact: ModelArtifact, batch: tuple[np.ndarray, np.ndarray]
) -> None:
    import torch
    from opacus import GradSampleModule

    from export.zoo import build

    x, y = batch[0][:6], batch[1][:6]
    params = lenet_artifact.initial_params()
    model = build("lenet", lenet_artifact.manifest.input_shape, lenet_artifact.manifest.num_classes)
    model.load_state_dict({k: torch.tensor(v) for k, v in params.items()})
    gsm = GradSampleModule(model)
    torch.nn.functional.cross_entropy(gsm(torch.tensor(x)), torch.tensor(y)).backward()
    want = {n: p.grad_sample.numpy() for n, p in gsm._module.named_parameters()}
    assert set(want) == set(params)
    for runtime in ("onnx", "torch"):
        _, got = protect.per_example_grads(load_backend(runtime, lenet_artifact), params, x, y)
        for k in params:
            np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-5, err_msg=runtime)


@pytest.mark.parametrize("algorithm", ["fedsgd", "fedavg"])
def test_dpsgd_onnx_equals_torch(
    algorithm: str, lenet_artifact: ModelArtifact, batch: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = batch
    steps = protect.parse("dpsgd:clip=0.5,sigma=1.3")
    plan = protect.LocalPlan(algorithm, epochs=1, batch_size=8, lr=0.1)
    results = [
        protect.protected_training(
            steps,
            load_backend(rt, lenet_artifact),
            lenet_artifact.initial_params(),
            x,
            y,
            plan,
            rng=np.random.default_rng([7, 1]),
            noise_rng=np.random.default_rng([7, 1, 1]),
            num_classes=10,
        )  # fmt: skip
        for rt in ("onnx", "torch")
    ]
    a, b = results
    assert (a.num_examples, a.kind) == ((8, "gradient") if algorithm == "fedsgd" else (40, "delta"))
    np.testing.assert_array_equal(a.used, b.used)
    for k in a.params:
        np.testing.assert_allclose(a.params[k], b.params[k], rtol=0, atol=1e-5)
    # the noise is there: σ·C/B per coordinate dominates a clipped mean of norm <= C
    if algorithm == "fedsgd":
        n_params = sum(v.size for v in a.params.values())
        assert protect.l2_norm(a.params) > 0.5 * 1.3 * 0.5 / 8 * math.sqrt(n_params)


def test_dpsgd_step_is_clipped_sum_plus_noise(
    lenet_artifact: ModelArtifact, batch: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = batch[0][:5], batch[1][:5]
    backend = load_backend("onnx", lenet_artifact)
    params = lenet_artifact.initial_params()
    got = protect.dpsgd_gradient(
        backend, params, x, y, clip=0.1, sigma=0.7, denominator=4.0, rng=np.random.default_rng(3)
    )
    rng = np.random.default_rng(3)
    total = {k: np.zeros(v.shape) for k, v in params.items()}
    for i in range(5):
        g = protect.clip_l2(backend.loss_and_grad(params, x[i : i + 1], y[i : i + 1]).grads, 0.1)
        assert protect.l2_norm(g) <= 0.1 * (1 + 1e-6)
        for k in total:
            total[k] += g[k]
    noise = {k: rng.normal(0.0, 0.07, size=v.shape) for k, v in params.items()}
    for k in params:
        np.testing.assert_allclose(got.grads[k], (total[k] + noise[k]) / 4.0, rtol=0, atol=1e-6)


# -- accounting ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "q, sigma, steps", [(0.01, 1.1, 1000), (16 / 3000, 0.8, 188 * 5), (1.0, 4.0, 10)]
)
def test_epsilon_matches_opacus_rdp(q: float, sigma: float, steps: int) -> None:
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    rdp = compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders)
    want, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=1e-5)
    n = round(1 / q) * 16 if q < 1 else 16
    step = protect.DPSGD(clip=1.0, sigma=sigma)
    per_round = protect.dpsgd_sampling("fedavg", n, 16, 1)[1]
    assert per_round * (steps // per_round) == steps
    ev = round_event(step, sigma=sigma, algorithm="fedavg", examples=n, batch_size=16, epochs=1)
    got = epsilon([ev] * (steps // per_round), 1e-5)
    assert got == pytest.approx(float(want), rel=0.01)


def test_calibration_round_trip() -> None:
    step = protect.DPSGD(clip=1.0)

    def eps(sigma: float) -> float:
        return run_epsilon(
            step, sigma, 1e-5, rounds=5, algorithm="fedavg", shard_sizes=[300, 500],
            batch_size=16, epochs=1,
        )  # fmt: skip

    sigma = calibrate_sigma(eps, 3.0, 1e-5)
    assert eps(sigma) <= 3.0 < eps(sigma * 0.999)
    assert eps(sigma) == pytest.approx(3.0, rel=0.01)
    # the smaller shard (larger sampling rate) is the binding one
    assert eps(sigma) == run_epsilon(
        step, sigma, 1e-5, rounds=5, algorithm="fedavg", shard_sizes=[300], batch_size=16, epochs=1
    )
    with pytest.raises(ValueError, match=r"needs σ > 100"):
        calibrate_sigma(eps, 1e-4, 1e-5)


def test_calibrate_protect_rewrites_sigma_or_refuses() -> None:
    cfg = ExperimentConfig(rounds=4, protect="dp:clip=2", dp_epsilon=8.0, dp_delta=1e-5)
    out = calibrate_protect(cfg, [100] * cfg.devices)
    (step,) = protect.parse(out.protect)
    assert isinstance(step, protect.DP) and step.clip == 2.0 and step.sigma is not None
    gauss = round_event(step, sigma=step.sigma, algorithm="fedavg", examples=100, batch_size=16,
                        epochs=1)  # fmt: skip
    assert epsilon([gauss] * 4, 1e-5) == pytest.approx(8.0, rel=1e-3)
    assert out.dp_epsilon == 0.0
    with pytest.raises(ConfigError, match="dp over 500 rounds: .* ask for fewer --rounds"):
        calibrate_protect(
            ExperimentConfig(rounds=500, protect="dp:clip=1", dp_epsilon=0.01), [100] * 20
        )


# -- update-level DP on the device, central DP on the coordinator --------------------------------


def test_device_update_under_dp_is_clipped_plus_noise(
    lenet_artifact: ModelArtifact, batch: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = batch
    dev = Device("d1", "r", lenet_artifact, load_backend("onnx", lenet_artifact), x, y, seed=11)
    w0 = lenet_artifact.initial_params()
    task = wire.Task(
        run="r", round=3, device="d1", algorithm="fedsgd", lr=0.1, epochs=1, batch_size=8,
        model_hash=lenet_artifact.manifest.sha256, weights=w0, protect="dp:clip=0.2,sigma=0.5",
    )  # fmt: skip
    payload = wire.encode_task(task)
    assert wire.decode_task(payload, lenet_artifact.manifest).protect == "dp:clip=0.2,sigma=0.5"
    (out,) = dev.handle(Received(wire.task_topic("r", "d1"), payload, False, time.time()))
    update = wire.decode_update(out.payload, lenet_artifact.manifest)
    assert json.loads(update.defence) == {"protect": [{"name": "dp", "clip": 0.2, "sigma": 0.5}]}
    # the same batch, clipped, plus the device's seeded noise
    idx = minibatches(len(x), 8, device_rng(11, "d1", 3))[0]
    g = protect.clip_l2(dev.backend.loss_and_grad(w0, x[idx], y[idx]).grads, 0.2)
    noise = protect.gaussian_like(g, 0.1, dev.noise_rng(3))
    for k in g:
        np.testing.assert_allclose(update.params[k], g[k] + noise[k], rtol=0, atol=1e-6)
    d = sum(v.size for v in g.values())
    # ‖u‖² = ‖clip(g)‖² + ‖noise‖² + 2<g, noise>: within 6 std of σ²C²d + ‖clip(g)‖²
    sq = protect.l2_norm(update.params) ** 2
    assert (
        abs(sq - (0.01 * d + protect.l2_norm(g) ** 2)) < 6 * 0.01 * math.sqrt(2 * d) + 4 * 0.2 * 0.1
    )


def test_device_refuses_a_task_it_cannot_follow(
    lenet_artifact: ModelArtifact, batch: tuple[np.ndarray, np.ndarray]
) -> None:
    dev = Device(
        "d1", "r", lenet_artifact, load_backend("onnx", lenet_artifact), *batch,
        key=bytes(32), decoy_data=batch,
    )  # fmt: skip
    cases = [("dp:clip=1", 0), ("dummy:m=2,source=public", 0), ("laplace:1", 0),
             ("decoys:k=2", 0), ("decoys:k=2", 1),
             ("distributed_dp:clip=1,sigma=1,shares=4", 0)]  # fmt: skip
    for i, (spec, decoys) in enumerate(cases):
        task = wire.Task(
            run="r", round=1 + i, device="d1", algorithm="fedsgd", lr=0.1, epochs=1,
            batch_size=8, model_hash=lenet_artifact.manifest.sha256,
            weights=lenet_artifact.initial_params(), protect=spec, decoys=decoys,
        )  # fmt: skip
        msg = Received(wire.task_topic("r", "d1"), wire.encode_task(task), False, time.time())
        assert dev.handle(msg) == []
    assert dev.rejected == {"bad_protect": 6}


def test_distributed_dp_adds_a_share_of_the_noise(
    lenet_artifact: ModelArtifact, batch: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = batch
    backend = load_backend("onnx", lenet_artifact)
    w0 = lenet_artifact.initial_params()
    plan = protect.LocalPlan("fedsgd", 1, 8, 0.1)
    steps = protect.parse("distributed_dp:clip=0.2,sigma=0.5,shares=25")
    out = protect.protected_training(
        steps, backend, w0, x, y, plan, rng=device_rng(1, "d", 1),
        noise_rng=np.random.default_rng(9), num_classes=10,
    )  # fmt: skip
    idx = minibatches(len(x), 8, device_rng(1, "d", 1))[0]
    g = protect.clip_l2(backend.loss_and_grad(w0, x[idx], y[idx]).grads, 0.2)
    noise = protect.gaussian_like(g, 0.5 * 0.2 / 5, np.random.default_rng(9))
    for k in g:
        np.testing.assert_allclose(out.params[k], g[k] + noise[k], rtol=0, atol=1e-7)
    with pytest.raises(protect.ProtectError, match="shares is not set"):
        protect.protected_training(
            protect.parse("distributed_dp:clip=0.2,sigma=0.5"), backend, w0, x, y, plan,
            rng=device_rng(1, "d", 1), noise_rng=np.random.default_rng(9), num_classes=10,
        )  # fmt: skip


def test_distributed_sigma_counts_the_surviving_shares() -> None:
    assert distributed_sigma(2.0, survivors=100, shares=100) == 2.0
    assert distributed_sigma(2.0, survivors=70, shares=100) == pytest.approx(2.0 * math.sqrt(0.7))
    with pytest.raises(ValueError, match="survivors=0 of shares=10"):
        distributed_sigma(1.0, survivors=0, shares=10)


def test_dummy_examples_join_every_batch(lenet_artifact: ModelArtifact) -> None:
    x = np.random.default_rng(0).uniform(-1, 2, size=(10, 1, 28, 28)).astype(np.float32)
    y = np.arange(10) % 10
    seen: list[tuple[np.ndarray, np.ndarray]] = []
    backend = load_backend("onnx", lenet_artifact)

    class Spy:
        name = "spy"

        def loss_and_grad(self, p, xb, yb):  # type: ignore[no-untyped-def]
            seen.append((xb, yb))
            return backend.loss_and_grad(p, xb, yb)

    r = protect.protected_training(
        protect.parse("dummy:m=3"), Spy(), lenet_artifact.initial_params(), x, y,  # type: ignore[arg-type]
        protect.LocalPlan("fedavg", 1, 4, 0.1), rng=np.random.default_rng(1),
        noise_rng=np.random.default_rng(2), num_classes=10,
    )  # fmt: skip
    assert [len(b[0]) for b in seen] == [4 + 3, 4 + 3, 2 + 3]
    assert r.num_examples == 10 and sorted(r.used.tolist()) == list(range(10))
    for xb, yb in seen:
        dummies = xb[-3:]
        assert dummies.min() >= x.min() and dummies.max() <= x.max()
        assert not any(np.array_equal(d, e) for d in dummies for e in x)
        assert yb[-3:].min() >= 0 and yb[-3:].max() < 10


def test_central_dp_mean_is_clipped_sum_plus_noise_over_selected() -> None:
    rng = np.random.default_rng(0)
    ups = [
        {
            "a": rng.normal(size=(3, 2)).astype(np.float32) * s,
            "b": rng.normal(size=4).astype(np.float32),
        }
        for s in (0.1, 5, 9)
    ]
    noise = {"a": rng.normal(size=(3, 2)), "b": rng.normal(size=4)}
    got = central_dp_mean(ups, clip=1.0, noise=noise, denominator=4)
    norms = [
        math.sqrt(
            float((u["a"].astype(np.float64) ** 2).sum() + (u["b"].astype(np.float64) ** 2).sum())
        )
        for u in ups
    ]
    want = {
        k: (
            (
                sum(
                    u[k].astype(np.float64) * min(1.0, 1.0 / n)
                    for u, n in zip(ups, norms, strict=True)
                )
                + noise[k]
            )
            / 4
        )
        for k in ("a", "b")
    }
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-6)


@pytest.mark.parametrize("codec", ["f32", "int8", "int8c", "topk:0.01", "topk:0.01+int8"])
def test_updates_decode_in_manifest_order_whatever_the_codec(
    lenet_artifact: ModelArtifact, codec: str
) -> None:
    """Compressed codecs pack parameters in sorted-name order; the decoder hands them back in
    the manifest's order, which the eavesdropper's attacks rely on."""
    w = lenet_artifact.initial_params()
    tensors, corrected, _ = wire.get_codec(codec).compress(w, None, lenet_artifact.manifest)
    u = wire.Update(run="r", round=1, device="d", kind="gradient", num_examples=1,
                    params=corrected, codec=codec)  # fmt: skip
    back = wire.decode_update(wire.encode_update(u, tensors=tensors), lenet_artifact.manifest)
    assert list(back.params) == list(lenet_artifact.manifest.param_names)
    assert list(back.params) != sorted(back.params)
