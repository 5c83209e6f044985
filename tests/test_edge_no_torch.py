"""The device runtime imports and trains where torch cannot be imported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from edge.backends.onnx import OnnxBackend
from export import export_model

REPO = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter: a meta path finder makes every `import torch...` fail first.
DEVICE_SCRIPT = """
import json, sys

class BlockTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"torch is blocked on this device: import {name}")
        return None

sys.meta_path.insert(0, BlockTorch())
import numpy as np
import edge, edge.codec, edge.compress, edge.decoy, edge.device, edge.manifest, edge.backends.onnx

artifact = edge.manifest.ModelArtifact.load(sys.argv[1])
backend = edge.backends.onnx.OnnxBackend(artifact)
rng = np.random.default_rng(7)
x = rng.standard_normal((4, *artifact.manifest.input_shape), dtype=np.float32)
y = rng.integers(0, artifact.manifest.num_classes, 4)
step = backend.loss_and_grad(artifact.initial_params(), x, y)
print(json.dumps({
    "loss": step.loss,
    "grad_sums": {k: float(v.sum()) for k, v in step.grads.items()},
    "torch_loaded": any(m == "torch" or m.startswith("torch.") for m in sys.modules),
}))
"""


def test_onnx_step_runs_without_torch(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    artifact = export_model("mlp", tmp_path / "mlp")
    proc = subprocess.run(
        [sys.executable, "-c", DEVICE_SCRIPT, str(artifact.folder)],
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["torch_loaded"] is False

    # The same step in this process gives the same numbers.
    rng = np.random.default_rng(7)
    x = rng.standard_normal((4, *artifact.manifest.input_shape), dtype=np.float32)
    y = rng.integers(0, artifact.manifest.num_classes, 4)
    step = OnnxBackend(artifact).loss_and_grad(artifact.initial_params(), x, y)
    assert result["loss"] == step.loss
    assert result["grad_sums"] == {k: float(v.sum()) for k, v in step.grads.items()}


def test_blocking_really_blocks_torch() -> None:
    script = DEVICE_SCRIPT.split("import numpy")[0] + "import torch\n"
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode != 0
    assert "torch is blocked" in proc.stderr
