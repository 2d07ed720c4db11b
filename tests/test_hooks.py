"""Hooks and the method's own state (issue 10 §1-2): a stop asked by one rank is agreed by all, every rank
checkpoints and stops, the rerun resumes from that checkpoint; every checkpoint is reported; the method's
consecutive non-finite counters survive a resume (and a world-size change)."""
import json
import subprocess
import sys
from pathlib import Path

import yaml

from unidad_dist import testing

HERE = Path(__file__).resolve().parent


def test_a_stop_asked_by_one_rank_stops_every_rank_at_a_checkpoint_and_the_rerun_resumes(tmp_path, pipes):
    from unidad_dist.device import free_port
    from unidad_dist.train import checkpoint

    rdir = tmp_path / "run"
    rec = testing.tiny_recipe(pipes["pixel"], pipes["shots"], rdir, **{
        "train.iterations": 5, "train.batch_size": 1, "checkpoint.every": 0, "run.dist_timeout": 30.0})
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(rec))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(HERE / "hook_worker.py"), str(recipe), str(tmp_path / "out"), "1", "2"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    seen = [json.loads((tmp_path / "out" / f"rank{i}.json").read_text()) for i in range(2)]
    for s in seen:  # rank 0 never asked, yet stopped with rank 1, after the same iteration
        assert s["steps"] == [0, 1] and s["started"] == 0 and s["finished"] is False and s["closed"]
        assert [c[1] for c in s["checkpoints"]] == [0, 2] and all(c[2] for c in s["checkpoints"])
    assert checkpoint.latest_complete(rdir).name == "iter_0000002"
    assert not (rdir / "summary.json").exists()  # the run did not finish: no final evaluation
    assert not (rdir / "run.lock").exists()
    r = subprocess.run([sys.executable, "-m", "unidad_dist", "launch", "local", "--nproc", "2", "--config",
                        str(recipe)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout and "iteration 2" in r.stdout
    assert json.loads((rdir / "summary.json").read_text())["iterations"] == 5
    assert checkpoint.latest_complete(rdir).name == "iter_0000005"


def test_the_methods_state_survives_a_resume(make_cfg, rt, tmp_path):
    from unidad_dist.methods.unidad import UniDAD
    from unidad_dist.parallel import engines
    from unidad_dist.train import checkpoint
    from unidad_dist.train.build import build

    def made():
        cfg = make_cfg()
        models = build(cfg, rt)
        engines.attach(models, cfg, rt)
        return models, UniDAD(cfg, models, rt)

    models, method = made()
    method.nonfinite_run["fake_teacher"] = 3
    method.nonfinite_total.update({"fake_teacher": 5, "student": 1})
    ckpt = checkpoint.save(tmp_path / "run", models, 7, rt, method, keep=2)
    assert json.loads((ckpt / "method_rank0.json").read_text())["nonfinite_run"] == {"fake_teacher": 3}
    models2, fresh = made()
    assert fresh.nonfinite_run["fake_teacher"] == 0
    assert checkpoint.load(ckpt, models2, rt, fresh) == 7
    assert fresh.nonfinite_run["fake_teacher"] == 3 and fresh.nonfinite_total == {"fake_teacher": 5, "student": 1}
    # written at another world size: each role's counter from the ranks that step it (zero elsewhere)
    merged = UniDAD.merge_state_dicts([{"nonfinite_run": {"student": 2}, "nonfinite_total": {"student": 4}},
                                       {"nonfinite_run": {"fake_teacher": 1, "student": 0}, "nonfinite_total": {}}])
    assert merged == {"nonfinite_run": {"student": 2, "fake_teacher": 1}, "nonfinite_total": {"student": 4}}


def test_a_stop_at_the_last_iteration_is_a_finished_run_and_an_earlier_one_is_not(make_cfg, rt, tmp_path):
    from unidad_dist.train.hooks import Hook
    from unidad_dist.train.loop import train

    class StopAt(Hook):
        def __init__(self, at):
            self.at, self.reported = at, []

        def should_stop(self, run, done):
            return done >= self.at

        def on_checkpoint(self, run, path, iteration):
            self.reported.append(iteration)

    cfg = make_cfg(**{"train.iterations": 3, "run.dir": str(tmp_path / "a")})
    stop = StopAt(2)
    train(cfg, rt, hooks=[stop])
    assert stop.reported == [0, 2] and not (tmp_path / "a" / "summary.json").exists()
    last = StopAt(3)
    train(cfg, rt, hooks=[last])  # resumes at 2, stops (agreed) at the last iteration: finished
    assert last.reported == [3] and (tmp_path / "a" / "summary.json").is_file()
