"""The default recipe for a target of your own (recipes/demo_new_target.yaml), unchanged, on a target domain
nobody tuned it for (issue 11), against an a = 0 control; and the demo's recipe on the generated second domain
(issue 13).

The recipes and the built-in teacher were tuned on ``builtin.TUNED`` only; the first runs one of
``builtin.HELD_OUT`` (benchmarks/heldout_domains.py runs all of them). A small fall of the proxy distance
proves nothing (with a = 0 samples only sharpen, and the GAN alone moves colours), so the adapted run must
meet the acceptance and the control's fall must be at most half as large. The control has no target teacher,
so no student warm start from it either; each fall is measured from the student as the run found it (the adapted
run's warm start counts as the adaptation it is)."""
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from unidad_dist import builtin
from unidad_dist.cli import main
from unidad_dist.eval.metrics import SHAPE_LIMIT
from benchmarks.heldout_domains import CONTROL, COPY_SAMPLES, _run, copy_rate_over, judged
from tools.check_demo import check_summary, initial_distance

ROOT = Path(__file__).resolve().parent.parent
ACCEPTANCE_KEYS = ("proxy_distance_ratio", "shape_distance", "copy_rate", "diversity", "noise_level")
DOMAIN = "forest_discs_light"  # held out: the first light-ground domain of its family, fixed when it was drawn


def _train(run_dir, shots, *over, recipe="demo"):
    args = ["train", "--config", recipe, f"run.dir={run_dir}", f"data.target.path={shots}", "logging.progress=false",
            *over]
    if main(args) != 0:  # pytest.fail: a run that fails is reported as such, not as a missed acceptance
        pytest.fail(f"training failed: {args}")
    return json.loads((run_dir / "summary.json").read_text())


def test_the_acceptance_refuses_grainy_samples():
    """A run whose proxy distance halves but whose samples are grainy (the squiggles a held-out run produced:
    ratio 0.42, noise 0.095 against the shots' 0.000) does not pass; a clean one does."""
    clean = {"proxy_distance_before": 10.0, "proxy_distance_after": 4.0, "copy_rate": 0.0, "diversity": 0.8,
             "noise_level": 0.02, "noise_level_shots": 0.0}
    assert check_summary(clean) == []
    grainy = {**clean, "noise_level": 0.095}
    assert any("noise_level 0.095" in p for p in check_summary(grainy))
    assert check_summary({**grainy, "noise_level_shots": 0.07}) == []  # noisy shots allow noisy samples


def test_the_acceptance_judges_the_ratio_from_the_student_before_its_warm_start():
    """The ratio is the whole run's: from the student as the run found it (proxy_distance_initial), not as its
    warm start left it — a warm start that moved the student away from the target passed with the latter."""
    s = {"proxy_distance_initial": 10.0, "proxy_distance_before": 5.0, "proxy_distance_after": 4.0,
         "copy_rate": 0.0, "diversity": 0.8, "noise_level": 0.02, "noise_level_shots": 0.0}
    assert check_summary(s) == []
    bad = {**s, "proxy_distance_initial": 6.0, "proxy_distance_before": 20.0}
    assert check_summary(bad) == ["proxy_distance_after 4.0000 > 0.5 x proxy_distance_initial 6.0000"]
    assert check_summary({k: v for k, v in bad.items() if k != "proxy_distance_initial"}) == []  # an older summary


def test_the_acceptance_refuses_another_shape():
    """Blobs or another shape in the shots' colours (red blobs for red triangles passed every other count: issue
    11) fail on the shape distance; a summary written before it existed is judged without it."""
    clean = {"proxy_distance_before": 10.0, "proxy_distance_after": 4.0, "copy_rate": 0.0, "diversity": 0.8,
             "noise_level": 0.02, "noise_level_shots": 0.0}
    assert SHAPE_LIMIT == 1.0
    assert check_summary({**clean, "shape_distance": SHAPE_LIMIT}) == []
    assert any("shape_distance 1.01" in p for p in check_summary({**clean, "shape_distance": 1.01 * SHAPE_LIMIT}))
    assert check_summary(clean) == []


def test_the_demos_own_acceptance_asks_diversity_06(tmp_path, capsys):
    """On its own target the demo must reach diversity >= 0.6 (issue 13), held-out domains 0.5 (issue 11): CI's
    `tools/check_demo.py SUMMARY --min-diversity 0.6` fails a demo at 0.55."""
    from tools import check_demo

    s = {"proxy_distance_before": 10.0, "proxy_distance_after": 4.0, "copy_rate": 0.0, "diversity": 0.55,
         "noise_level": 0.02, "noise_level_shots": 0.0, "shape_distance": 0.2}
    assert check_summary(s) == [] and check_summary(s, 0.6) == ["diversity 0.550 < 0.6"]
    (tmp_path / "summary.json").write_text(json.dumps(s))
    assert check_demo.main(["check_demo.py", str(tmp_path / "summary.json")]) == 0
    assert check_demo.main(["check_demo.py", str(tmp_path / "summary.json"), "--min-diversity", "0.6"]) == 1
    assert "diversity 0.550 < 0.6" in capsys.readouterr().out
    assert check_demo.DEMO_MIN_DIVERSITY == 0.6
    assert "--min-diversity 0.6" in (ROOT / ".ci" / "run").read_text()  # CI applies it to `make demo`


@pytest.mark.slow
def test_the_new_target_recipe_on_a_held_out_domain_meets_the_acceptance_and_beats_the_a0_control(tmp_path):
    """demo_new_target.yaml on forest_discs_light (held out; chosen when its family was drawn, before any run on
    it; docs/heldout.md §11): the run meets the whole acceptance (tools/check_demo.py; the copy rate over
    COPY_SAMPLES samples of the finished student, as the table judges it), the a = 0 control's fall is at most half
    the adapted run's, and sample and export work on its run folder. Both runs go through the held-out table's own
    command (benchmarks/heldout_domains.py: a subprocess at one thread, side by side), so the figures are the
    table's row digit for digit (the arithmetic's rounding moves with the thread count)."""
    assert DOMAIN in builtin.HELD_OUT and DOMAIN not in builtin.TUNED
    shots = builtin.make_shots(tmp_path / DOMAIN, DOMAIN, 10, 32, seed=77)
    with ThreadPoolExecutor(2) as pool:
        adapted, control = pool.map(lambda run: _run(tmp_path / run[0], shots, 0, run[1], threads=1),
                                    [("adapted", []), ("control", CONTROL)])
    copies = copy_rate_over(tmp_path / "adapted", threads=1)  # as the table measures it
    problems = check_summary(judged(adapted, copies))
    print("acceptance:", problems or "met", {k: judged(adapted, copies)[k] for k in ACCEPTANCE_KEYS},
          f"(copy rate over {COPY_SAMPLES} samples; over the run's own {adapted['num_samples']}: "
          f"{adapted['copy_rate']:.3f})")
    assert problems == [], (problems, adapted, copies)
    _assert_beats_control(adapted, control)
    # sample and export work on its run folder
    if main(["sample", "--run", str(tmp_path / "adapted"), "--steps", "2", "--num", "8",
             "--out", str(tmp_path / "s.png")]) != 0:
        pytest.fail("sample failed on the run folder")
    if main(["export", "--run", str(tmp_path / "adapted"), "--out", str(tmp_path / "export")]) != 0 or \
            not (tmp_path / "export" / "unet" / "diffusion_pytorch_model.safetensors").is_file():
        pytest.fail("export failed on the run folder")


def _assert_beats_control(adapted: dict, control: dict) -> None:
    """The a = 0 control's proxy fall is at most half the adapted run's (each from its student as the run found
    it)."""
    fall = 1 - adapted["proxy_distance_after"] / initial_distance(adapted)
    fall_control = 1 - control["proxy_distance_after"] / initial_distance(control)
    print(f"fall adapted {fall:.3f}, control {fall_control:.3f}")
    assert fall_control <= 0.5 * fall, (fall, fall_control)


@pytest.mark.slow
def test_the_demo_recipe_beats_its_a0_control_on_the_generated_second_domain(tmp_path):
    """Issue 13 §1, one seed in CI: on green_squares (generated; tuned on, not held out) the demo recipe's proxy
    distance falls and the a = 0 control's falls at most half as far. The demo's own acceptance on its blue discs
    is CI's `make demo` check; `benchmarks/heldout_domains.py --recipe demo --domains demo,green_squares --seeds
    0,1,2` runs all three seeds."""
    shots = builtin.make_shots(tmp_path / "green_squares", "green_squares", 10, 32, seed=77)
    adapted = _train(tmp_path / "adapted", shots)
    assert adapted["proxy_distance_ratio"] <= 0.5, adapted
    assert CONTROL == ["algorithm.a=0", "target_teacher.mode=off", "target_teacher.warm_start=0",
                       "student.warm_start=0"]  # nothing learnt from a target teacher, nor a warm start onto it
    _assert_beats_control(adapted, _train(tmp_path / "control", shots, *CONTROL))


@pytest.mark.slow
def test_the_shipped_teacher_samples_its_domain_cleanly():
    """Quality, not bits: the shipped demo teacher's own 25-step samples are near fresh images of its domain,
    clean and sharp — the gate tools/build_demo_teacher.py applies before it publishes a rebuilt one (a
    rebuild takes ~25 minutes on 2 cores, too long for CI)."""
    from diffusers import UNet2DModel

    from tools.build_demo_teacher import quality

    folder, why = builtin.shipped("demo_teacher")
    assert folder is not None, why
    _, cfg = builtin.BUILTINS["demo_teacher"]
    unet = UNet2DModel.from_pretrained(folder / "unet").eval()
    q, bad = quality(unet, cfg, n=64)
    assert bad == [], q
    # the gate can fail: an untrained network of the same shape falls short on every count it measures
    import torch

    torch.manual_seed(0)
    raw = UNet2DModel(**builtin.tiny_pixel_unet_config(cfg["resolution"], cfg["block_out_channels"],
                                                        cfg["layers_per_block"], cfg["norm_num_groups"])).eval()
    _, bad_raw = quality(raw, cfg, n=64)
    assert any("proxy distance" in b for b in bad_raw) and any("noise" in b for b in bad_raw), bad_raw


@pytest.mark.rebuild
def test_a_damaged_shipped_teacher_is_rebuilt_into_the_cache_and_samples_its_domain_cleanly(tmp_path, monkeypatch,
                                                                                         capsys):
    """Quality, not bits, of a rebuild (issue 13 §1): when the shipped weights do not match their sha256,
    ``builtin:demo_teacher`` pretrains the teacher into the cache (the path a user's machine takes), and that
    rebuilt teacher passes the gate tools/build_demo_teacher.py applies before publishing. About 25 minutes on
    2 cores: `make test-rebuild` (pytest --run-rebuild), not part of CI's run."""
    import shutil

    from diffusers import UNet2DModel

    from tools.build_demo_teacher import quality

    copy = tmp_path / "assets"
    shutil.copytree(builtin.ASSETS, copy)
    monkeypatch.setattr(builtin, "ASSETS", copy)
    monkeypatch.setenv("UNIDAD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(builtin, "_SHIPPED_OK", {})
    weights = copy / "demo_teacher" / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    folder = builtin.resolve("builtin:demo_teacher")
    assert folder.parent == tmp_path / "cache" / "builtin", folder
    assert "does not match the sha256" in capsys.readouterr().out
    _, cfg = builtin.BUILTINS["demo_teacher"]
    q, bad = quality(UNet2DModel.from_pretrained(folder / "unet").eval(), cfg, n=64)
    print("rebuilt teacher:", q)
    assert bad == [], q


def test_a_stopped_teacher_build_resumes_from_its_state_file_bit_for_bit(tmp_path):
    """Long teacher builds (tools/build_demo_teacher.py --state) span machines' sessions: a build stopped after
    its last state file continues from it and ends with exactly the weights of a build never stopped."""
    import torch
    from safetensors.torch import load_file

    cfg = dict(builtin.TEACHER, steps=8, warmup=2, batch=4, resolution=16)

    class Stop(Exception):
        pass

    def stop_at_6(step, ema):
        if step == 6:
            raise Stop

    builtin.pretrain_teacher(cfg, tmp_path / "straight", progress=False)
    state = tmp_path / "state.pt"
    with pytest.raises(Stop):  # stops after the state of step 4 was written, two steps later
        builtin.pretrain_teacher(cfg, tmp_path / "resumed", progress=False, snapshot=stop_at_6,
                                 state_file=state, state_every=4)
    assert torch.load(state, weights_only=True)["step"] == 4
    builtin.pretrain_teacher(cfg, tmp_path / "resumed", progress=False, state_file=state, state_every=4)
    a = load_file(tmp_path / "straight" / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "resumed" / "unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(Exception, match="another teacher config"):
        builtin.pretrain_teacher(dict(cfg, lr=1e-3), tmp_path / "other", progress=False, state_file=state)
