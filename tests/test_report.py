"""`unidad-dist report` (issue 14 §1, §5): the table's numbers are the run folder's, report.png shows the
curves and the grids, unreadable metrics lines are skipped and counted, a folder that is not a run and a run
with no metrics yet get a clear message. A hand-made run folder for most checks, one tiny real run."""
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from unidad_dist import builtin, testing
from unidad_dist.cli import main
from unidad_dist.config import config_from_dict, dump_yaml
from unidad_dist.train.report import _v, collect, figure_size, format_report, report
from unidad_dist.train.status import format_status, run_status

MAGENTA = (255, 0, 255)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("report_inputs")
    return {"pixel": testing.write_pixel_pipeline(root / "pixel"),
            "shots": builtin.make_shots(root / "shots", "blue_discs", 6, 16, seed=3)}


@pytest.fixture(autouse=True)
def plan_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("UNIDAD_CACHE", str(tmp_path / "cache"))  # role sizes go through the plan's cost cache


def _record(it, **values):
    return json.dumps({"iteration": it, **values})


def _png(path: Path, color, size=(40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def make_run(tiny, rdir: Path, metrics: bool = True) -> Path:
    """A finished run folder, by hand: config.yaml of a tiny recipe, metrics.jsonl with a corrupt line in the
    middle and a cut last line, eval_before.json, summary.json, grids, a 2-rank checkpoint, outcome.json."""
    cfg = config_from_dict(testing.tiny_recipe(tiny["pixel"], tiny["shots"], rdir, **{"train.iterations": 10}))
    rdir.mkdir(parents=True)
    (rdir / "config.yaml").write_text(dump_yaml(cfg))
    if not metrics:
        return rdir
    lines = [
        _record(0, **{"student/dmd_src": 0.5, "student/lr": 1e-4, "student/grad_norm": 3.0,
                      "fake_teacher/fake_denoise": 1.5, "fake_teacher/lr": 2e-4, "fake_teacher/grad_norm": 1.0,
                      "target_teacher/target_denoise": 1.25, "seconds_per_iteration": 2.0, "time/step_s": 1.5,
                      "throughput/samples_per_s": 1.0, "memory/rank0/max_allocated_gib": 0.5,
                      "perf/mfu": 0.1, "data/target/epoch": 0.0, "eval/fid": 90.0}),
        '{"iteration": 3, "student/dmd_src": 0.4',  # cut by a kill
        '{"iteration": 4, "student/dmd_src": "not a number"}',  # JSON, but no metrics record
        _record(5, **{"student/dmd_src": 0.25, "student/lr": 1e-4, "student/grad_norm": 2.0,
                      "student/skipped_nonfinite": 1.0, "fake_teacher/fake_denoise": 1.4, "fake_teacher/lr": 2e-4,
                      "fake_teacher/grad_norm": 0.5, "target_teacher/target_denoise": 1.2,
                      "seconds_per_iteration": 3.0, "time/step_s": 2.5, "throughput/samples_per_s": 2.0,
                      "memory/rank0/max_allocated_gib": 0.75, "perf/mfu": 0.2, "data/target/epoch": 1.0,
                      "eval/fid": 70.0}),
        # the student does not step at 9: its last loss is the one of iteration 5
        _record(9, **{"fake_teacher/fake_denoise": 1.375, "fake_teacher/lr": 2e-4, "fake_teacher/grad_norm": 0.25,
                      "target_teacher/target_denoise": 1.125, "seconds_per_iteration": 4.0, "time/step_s": 3.5,
                      "throughput/samples_per_s": 3.0, "memory/rank0/max_allocated_gib": 0.875,
                      "memory/rank1/max_allocated_gib": 1.125, "memory/rank0/rss_gib": 2.5,
                      "perf/mfu": 0.3, "data/target/epoch": 2.0, "eval/fid": 60.0}),
    ]
    (rdir / "metrics.jsonl").write_text("\n".join(lines) + "\n" + '{"iteration": 10, "student/dm')  # being written
    (rdir / "eval_before.json").write_text(json.dumps(
        {"proxy_distance": 61.5, "copy_rate": 0.0, "noise_level": 1.125, "noise_level_shots": 0.0625}))
    (rdir / "summary.json").write_text(json.dumps(
        {"iterations": 10, "proxy_distance_before": 61.5, "proxy_distance_after": 30.75, "copy_rate": 0.125,
         "copy_rate_before": 0.0, "noise_level": 0.5, "noise_level_before": 1.125, "noise_level_shots": 0.0625,
         "proxy_distance_ratio": 0.5, "student_steps": 2,
         "wall_time_s": {"build_s": 1.5, "train_s": 12.25, "total_s": 20.0}}))
    samples = rdir / "samples"
    _png(samples / "target_shots.png", MAGENTA)
    _png(samples / "student_before.png", (0, 0, 0))
    _png(samples / "iter_0000005.png", (40, 40, 40))
    _png(samples / "iter_0000010.png", (80, 80, 80))
    _png(samples / "student_after.png", (120, 120, 120))
    _png(samples / "source_teacher.png", (160, 160, 160))
    ckpt = rdir / "checkpoints" / "iter_0000010"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text(json.dumps({"iteration": 10, "method": "unidad", "world_size": 2}))
    (ckpt / "manifest.json").write_text(json.dumps({"checksum": "xxh3_128", "files": {"state.json": "-"}}))
    (rdir / "outcome.json").write_text(json.dumps({"outcome": "finished", "checkpoint": "iter_0000010"}))
    return rdir


def test_the_table_holds_the_run_folders_numbers(tiny, tmp_path):
    from diffusers import UNet2DModel

    rdir = make_run(tiny, tmp_path / "run")
    rep, records = collect(rdir)
    assert [r["iteration"] for r in records] == [0, 5, 9]
    assert rep["metrics_lines_skipped"] == 3  # the cut line, the one that is no record, the line being written
    assert rep["last_per_role"]["student"] == {"dmd_src": 0.25, "lr": 1e-4, "grad_norm": 2.0, "skipped_nonfinite": 1.0}
    assert rep["last_per_role"]["fake_teacher"] == {"fake_denoise": 1.375, "lr": 2e-4, "grad_norm": 0.25}
    assert rep["last_per_role"]["target_teacher"] == {"target_denoise": 1.125}
    assert rep["last_time"] == {"time/step_s": 3.5} and rep["last_other"] == {"eval/fid": 60.0}
    assert rep["last_memory"] == {"memory/rank*/max_allocated_gib": 1.125, "memory/rank*/rss_gib": 2.5}
    assert rep["samples_per_s"] == 2.0  # median of the logged 1, 2, 3
    assert rep["world_size"] == 2 and rep["placement"] == "colocated"
    assert all(r["ranks"] == [0, 1] for r in rep["roles"].values())
    # sizes: the source teacher is the pipeline's UNet, counted here from the real network
    unet = UNet2DModel.from_pretrained(str(tiny["pixel"] / "unet"))
    n = sum(p.numel() for p in unet.parameters())
    roles = rep["roles"]
    assert roles["source_teacher"]["params"] == n and roles["source_teacher"]["trainable_params"] == 0
    assert roles["student"]["params"] == roles["student"]["trainable_params"] == n
    assert roles["fake_teacher"]["params"] > n  # its GAN heads
    assert rep["wall_time_s"] == {"build_s": 1.5, "train_s": 12.25, "total_s": 20.0}
    assert ("proxy_distance", 61.5, 30.75, None) in rep["proxies"]
    assert ("copy_rate", 0.0, 0.125, None) in rep["proxies"]
    assert ("noise_level", 1.125, 0.5, 0.0625) in rep["proxies"]
    assert rep["summary_values"] == {"proxy_distance_ratio": 0.5, "student_steps": 2}
    assert rep["best_checkpoint"] is None

    text = format_report(rep)
    for part in ("dmd_src 0.25", "skipped_nonfinite 1", "fake_denoise 1.375", "target_denoise 1.125",
                 "step_s 3.5", "eval/fid 60", "memory     max_allocated_gib 1.125  rss_gib 2.5 (the largest over the ranks)", "samples/s  2 ",
                 "world      2 ranks (from iter_0000010), placement colocated", "train 12.2 s",
                 f"{_v(n / 1e3)[:4]}", "skipped 3 unreadable lines of metrics.jsonl",
                 "best       none recorded (`unidad-dist evaluate --run DIR --all eval.select=<metric>` picks one); latest complete: iter_0000010",
                 "state      finished", "iteration  10 of 10", "also source_teacher.png"):
        assert part in text, (part, text)
    row = next(line for line in text.splitlines() if "proxy_distance " in line)
    assert row.split()[-3:] == ["61.5", "30.75", "-"], row
    assert "skipped 3 unreadable lines" in format_status(run_status(rdir))


def test_report_png_has_every_panel_and_the_grids(tiny, tmp_path, capsys):
    rdir = make_run(tiny, tmp_path / "run")
    assert main(["report", "--run", str(rdir)]) == 0
    out = capsys.readouterr().out
    png = rdir / "report.png"
    assert f"figure     {png}" in out
    with Image.open(png) as im:
        arr = np.asarray(im.convert("RGB"))
    # 3 loss panels, lr, grad norm, seconds/iteration, memory, samples/s, mfu, eval/fid, proxies: 11 panels
    # in 4 rows of 3; a row of 5 grids (target shots, before, 2 over time, after)
    assert figure_size(11, 5) == (1500, 1660)  # 0.4 in title + 4 x 3.2 in + 15/5 in + 0.4 in (titles), 100 dpi
    assert arr.shape == (1660, 1500, 3)
    assert (arr == MAGENTA).all(axis=-1).sum() > 1000  # the target shots are drawn
    assert arr.std() > 10
    assert main(["report", "--run", str(rdir), "--out", str(tmp_path / "elsewhere" / "r.png"), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["report_png"] == str(tmp_path / "elsewhere" / "r.png") and (tmp_path / "elsewhere" / "r.png").is_file()
    assert [Path(p).name for _, p in rep["grids"]] == ["target_shots.png", "student_before.png", "iter_0000005.png",
                                                       "iter_0000010.png", "student_after.png"]


def test_a_line_being_written_is_skipped_then_read_once_complete(tiny, tmp_path):
    rdir = make_run(tiny, tmp_path / "run")
    with open(rdir / "metrics.jsonl", "a") as f:
        f.write('st/x": 1.0, "student/dmd_src": 0.125}\n')  # the live writer finishes its line
    rep, records = collect(rdir)
    assert rep["metrics_lines_skipped"] == 2  # only the line a kill cut and the one that is no record
    assert records[-1]["iteration"] == 10 and rep["last_per_role"]["student"]["dmd_src"] == 0.125
    assert "skipped 2 unreadable lines of metrics.jsonl" in format_report(rep)
    assert not any("summary.json" in n for n in rep["notes"])
    summary = json.loads((rdir / "summary.json").read_text())
    (rdir / "summary.json").write_text(json.dumps({**summary, "iterations": 8}))  # then resumed to 10
    assert ("note       summary.json (wall time, proxies after) is from the end of an earlier train.iterations=8; "
            "this run now trains to 10") in format_report(collect(rdir)[0])
    (rdir / "metrics.jsonl").write_text(_record(0, **{"student/dmd_src": 0.5}) + "\n" + '{"iteration": 1')
    assert "metrics    skipped 1 unreadable line of metrics.jsonl (cut by a kill, or being written)" in \
        format_report(collect(rdir)[0])


def test_at_most_eight_grids_evenly_over_time_with_the_last(tiny, tmp_path):
    rdir = make_run(tiny, tmp_path / "run")
    for it in range(20, 110, 10):  # 9 more grids over time: 5, 10, 20, ..., 100
        _png(rdir / "samples" / f"iter_{it:07d}.png", (0, 0, 200))
    names = [Path(p).name for _, p in collect(rdir)[0]["grids"]]
    assert names == ["target_shots.png", "student_before.png", "iter_0000005.png", "iter_0000020.png",
                     "iter_0000050.png", "iter_0000080.png", "iter_0000100.png", "student_after.png"]


def test_not_a_run_and_no_metrics_yet(tiny, tmp_path, capsys):
    for cmd in ("report", "status"):
        assert main([cmd, "--run", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert err.strip() == (f"error: '{tmp_path}' is not a run folder (no config.yaml); pass the run.dir of a "
                               "training run"), err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.yaml").write_text("run: [unclosed\n")
    for cmd in ("report", "status"):
        assert main([cmd, "--run", str(bad)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "config.yaml' cannot be read" in err, err

    rdir = make_run(tiny, tmp_path / "fresh", metrics=False)  # a run still building: config.yaml only
    assert main(["report", "--run", str(rdir)]) == 0
    out = capsys.readouterr().out
    assert "metrics    none logged yet" in out and "figure     none written" in out, out
    assert "world      unknown (no checkpoint yet)" in out and "state      not running" in out
    assert not (rdir / "report.png").exists()
    _png(rdir / "samples" / "target_shots.png", MAGENTA)  # the shots come before the first iteration
    rep, path = report(rdir)
    assert path == rdir / "report.png"
    with Image.open(path) as im:
        assert im.size == figure_size(0, 1)
    assert main(["status", "--run", str(rdir)]) == 0
    assert "no metrics logged yet" in capsys.readouterr().out


def test_a_real_tiny_run(tiny, tmp_path, capsys):
    rec = testing.tiny_recipe(tiny["pixel"], tiny["shots"], tmp_path / "run",
                              **{"logging.every": 1, "logging.sample_every": 1})
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(rec))
    assert main(["train", "--config", str(recipe)]) == 0
    rdir = tmp_path / "run"
    capsys.readouterr()
    assert main(["report", "--run", str(rdir)]) == 0
    out = capsys.readouterr().out
    last = json.loads((rdir / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("student/gan_g", "fake_teacher/gan_d", "target_teacher/target_denoise", "student/grad_norm"):
        role, name = key.split("/")
        line = next(x for x in out.splitlines() if x.split()[:1] == [role] and "|" in x)  # the losses row
        assert f"{name} {_v(last[key])}" in line, (key, line)
    assert "world      1 rank (from iter_0000002)" in out and "state      finished" in out
    assert "unreadable" not in out
    summary = json.loads((rdir / "summary.json").read_text())
    assert f"train {summary['wall_time_s']['train_s']:.1f} s" in out
    rep, _ = collect(rdir)
    assert [Path(p).name for _, p in rep["grids"]] == ["target_shots.png", "student_before.png", "iter_0000001.png",
                                                       "iter_0000002.png", "student_after.png"]
    logged = {k for line in (rdir / "metrics.jsonl").read_text().splitlines() for k in json.loads(line)}
    # 3 loss panels, lr, grad norm, s/iteration, proxies; one for memory and one per throughput/perf key logged
    panels = 7 + any(k.startswith("memory/") for k in logged) + sum(k.startswith(("throughput/", "perf/"))
                                                                    for k in logged)
    with Image.open(rdir / "report.png") as im:
        assert im.size == figure_size(panels, 5)
