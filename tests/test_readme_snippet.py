"""README's "Using it from Python" block, run as README writes it, on a checkpoint of a real run."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from lightning_stl.run import train

ROOT = Path(__file__).resolve().parents[1]


def readme_block(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index(title) :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_python_snippet_gives_the_runs_test_accuracy_and_leaves_the_model_alone(
    make_cfg, tmp_path
):
    # float32: the snippet evaluates in float32 (a fast-mode run's test_acc was measured in bf16)
    cfg = make_cfg(
        "data.target_size=50", "seed=0", "speed.fast_mode=false", output_dir=tmp_path / "run"
    )
    metrics = train(cfg)
    best = metrics["stages"][-1]["best_model_path"]
    code = readme_block("### Using it from Python")
    placeholder = '"outputs/.../checkpoints/joint/best-step2370.ckpt"'
    assert placeholder in code
    code = code.replace(placeholder, repr(best))
    # after the snippet: the model's state is still the checkpoint's (eval mode, no_grad)
    code += (
        "\nimport json\nstate = {k: v for k, v in model.state_dict().items()}\n"
        f"ref = torch.load({best!r}, map_location='cpu', weights_only=True)['state_dict']\n"
        "print(json.dumps({'unchanged': all(torch.equal(state[k], ref[k]) for k in ref)}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    accuracy = float(re.match(r"test accuracy (\d\.\d+)$", lines[-2]).group(1))
    assert abs(accuracy - metrics["test_acc"]) < 5e-5, (accuracy, metrics["test_acc"])
    assert json.loads(lines[-1]) == {"unchanged": True}
