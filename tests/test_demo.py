"""The demo's acceptance on a second, test-generated target domain, against an a = 0 control (issue §5).

A small fall of the proxy distance proves nothing (with a = 0 samples only sharpen and a colour-feature
distance still falls), so the adapted run must meet the acceptance and the control's fall must be at most
half as large."""
import json

import pytest

from unidad_dist import builtin
from unidad_dist.cli import main
from tools.check_demo import check_summary


def _train(run_dir, shots, *over):
    args = ["demo", f"run.dir={run_dir}", f"data.target.path={shots}", "logging.progress=false", *over]
    assert main(args) == 0
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.slow
def test_demo_adapts_to_a_generated_domain_and_beats_the_a0_control(tmp_path):
    shots = builtin.make_shots(tmp_path / "green_squares", "green_squares", 10, 32, seed=77)
    adapted = _train(tmp_path / "adapted", shots)
    assert check_summary(adapted) == [], adapted
    control = _train(tmp_path / "control", shots, "algorithm.a=0", "target_teacher.mode=off")
    fall = 1 - adapted["proxy_distance_after"] / adapted["proxy_distance_before"]
    fall_control = 1 - control["proxy_distance_after"] / control["proxy_distance_before"]
    print(f"fall adapted {fall:.3f}, control {fall_control:.3f}")
    assert fall_control <= 0.5 * fall, (fall, fall_control)
    # sample and export work on the demo's run folder
    assert main(["sample", "--run", str(tmp_path / "adapted"), "--steps", "2", "--num", "8",
                 "--out", str(tmp_path / "s.png")]) == 0
    assert main(["export", "--run", str(tmp_path / "adapted"), "--out", str(tmp_path / "export")]) == 0
    assert (tmp_path / "export" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
