"""checkpoint.async (issue 15 §4): the state is staged in host memory at the boundary and written by a background
thread while training goes on. Checked here on one rank; tests/test_resume_kill.py runs it on 2 ranks (the
writer's own gloo group) with a rank SIGKILLed during an asynchronous write."""
import errno
import io
import json
import threading

import pytest
import torch
import yaml

from unidad_dist import testing


def test_staged_copies_write_the_bytes_the_live_state_would_and_do_not_follow_it():
    from unidad_dist.core.staging import Stager

    flat = torch.randn(64)
    live = {"a": flat[:16], "b": [flat[16:].view(6, 8), (flat, 3)], "p": torch.nn.Parameter(torch.randn(3, 3)),
            "g": torch.randn(4, requires_grad=True), "cfg": {"k": [1, 2]}, "n": torch.tensor(7, dtype=torch.int64)}

    def saved(obj) -> bytes:
        buf = io.BytesIO()
        torch.save(obj, buf)
        z = __import__("zipfile").ZipFile(io.BytesIO(buf.getvalue()))  # all but the random serialization id
        return b"".join(z.read(n) for n in sorted(z.namelist()) if not n.endswith("serialization_id"))

    stager = Stager()
    before = saved(live)
    staged = stager.copy(live)
    assert saved(staged) == before  # the views still share one storage: the same bytes, not a bigger file
    assert staged["b"][0].untyped_storage().data_ptr() == staged["a"].untyped_storage().data_ptr()
    assert stager.bytes == 64 * 4 + 9 * 4 + 4 * 4 + 8
    flat.mul_(2)
    live["cfg"]["k"].append(3)
    assert saved(staged) == before  # a copy, not a reference to the live state
    ptr = staged["a"].untyped_storage().data_ptr()
    stager.release()
    again = stager.copy(live)  # the released buffers serve the next save
    assert again["a"].untyped_storage().data_ptr() == ptr and torch.equal(again["a"], flat[:16])


def _recipe(tmp_path, pipes, name, **over):
    rec = testing.tiny_recipe(pipes["pixel"], pipes["shots"], tmp_path / name, **{
        "train.iterations": 4, "checkpoint.every": 1, "checkpoint.keep": 10, "student.ema": 0.9,
        "logging.every": 1, **over})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(rec))
    return path


def test_an_async_checkpoint_holds_its_iterations_state_and_is_reported_once_published(tmp_path, pipes, monkeypatch):
    """Each background write is held back until the next iteration has changed the weights (and the EMA): the
    files must still be those of a synchronous run, and every checkpoint reaches on_checkpoint, in order, only
    once it is published."""
    from unidad_dist.config import load_config
    from unidad_dist.train import checkpoint
    from unidad_dist.train.hooks import Hook
    from unidad_dist.train.loop import train

    torch.manual_seed(0)
    train(load_config(_recipe(tmp_path, pipes, "sync")))

    gate = threading.Event()
    real_write, real_wait = checkpoint._Files.write, checkpoint.AsyncWriter.wait
    held = []

    def held_write(self):
        held.append(gate.wait(timeout=120))  # until the next iteration ran (or the loop waits for this one)
        gate.clear()
        real_write(self)

    def wait(self):
        gate.set()
        return real_wait(self)

    reported = []

    class Watch(Hook):
        def on_step_end(self, run, iteration, logs):
            gate.set()

        def on_checkpoint(self, run, path, iteration):
            reported.append((iteration, path.name, checkpoint.is_complete(path),
                             (path.parent / "latest").read_text().strip()))

    monkeypatch.setattr(checkpoint._Files, "write", held_write)
    monkeypatch.setattr(checkpoint.AsyncWriter, "wait", wait)
    torch.manual_seed(0)
    train(load_config(_recipe(tmp_path, pipes, "async", **{"checkpoint.async": True})), hooks=[Watch()])
    assert len(held) == 5 and all(held)
    assert reported == [(i, f"iter_{i:07d}", True, f"iter_{i:07d}") for i in range(5)], reported
    for i in range(5):
        a, b = (tmp_path / run / "checkpoints" / f"iter_{i:07d}" for run in ("sync", "async"))
        ma, mb = (json.loads((c / "manifest.json").read_text())["files"] for c in (a, b))
        assert set(ma) == set(mb) and "student/state/mp_rank_00_model_states.pt" in ma and "student.safetensors" in ma
        differ = sorted(k for k in ma if ma[k] != mb[k])
        assert set(differ) <= {"rng_rank0.pt"}, (i, differ)  # a zip holds a serialization id; the states:
        ra, rb = (torch.load(c / "rng_rank0.pt", weights_only=True) for c in (a, b))
        assert torch.equal(ra["torch"], rb["torch"]) and ra["python"] == rb["python"]
    metrics = [json.loads(line) for line in (tmp_path / "async" / "metrics.jsonl").read_text().splitlines()]
    assert all("time/checkpoint_s" in m for m in metrics[1:])


def test_a_failed_background_write_is_one_error_line_and_the_published_checkpoints_stay(tmp_path, pipes, capsys,
                                                                                          monkeypatch):
    from unidad_dist.cli import main
    from unidad_dist.train import checkpoint

    recipe = _recipe(tmp_path, pipes, "run", **{"train.iterations": 3, "checkpoint.async": True})
    real = checkpoint.torch_save_hashed
    writers = []

    def full_disk(obj, path, **kw):
        writers.append(threading.current_thread().name)
        if "iter_0000002" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, path, **kw)

    monkeypatch.setattr(checkpoint, "torch_save_hashed", full_disk)
    capsys.readouterr()
    assert main(["train", "--config", str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot write checkpoint iter_0000002" in err[0] and "No space left" in err[0] \
        and "iter_0000001 is intact" in err[0], err
    assert writers and all(n.startswith("checkpoint-writer-") for n in writers)  # written in the background
    assert checkpoint.latest_complete(tmp_path / "run").name == "iter_0000001"
    monkeypatch.setattr(checkpoint, "torch_save_hashed", real)
    assert main(["train", "--config", str(recipe)]) == 0  # the same command resumes
    assert checkpoint.latest_complete(tmp_path / "run").name == "iter_0000003"


def test_plan_names_the_host_copy_an_async_run_holds(repo_root):
    from unidad_dist.config import load_config
    from unidad_dist.parallel.plan import format_plan, make_plan

    for on in (False, True):
        cfg = load_config(repo_root / "recipes" / "demo.yaml", [f"checkpoint.async={str(on).lower()}"])
        plan = make_plan(cfg, 2)
        notes = [n for n in plan.notes if n.startswith("checkpoint.async")]
        assert len(notes) == int(on)
        if on:  # trainable roles' model states of rank 0: student, fake teacher (heads), target teacher
            held = sum(r.model_state_bytes for r in plan.roles.values() if r.trainable and 0 in r.ranks)
            assert f"about {held / 2**30:.2f} GiB" in notes[0] and held > 0
            assert notes[0] in format_plan(plan)


def test_a_cancelled_gate_or_a_failed_publish_leaves_the_last_checkpoint_standing(make_cfg, rt, tmp_path, monkeypatch):
    """The publish step itself: a run interrupted at once (the gate cancelled) publishes nothing; an error while
    rank 0 publishes (a full disk at the manifest) is raised as the checkpoint not published; then a normal one
    publishes."""
    from unidad_dist.core.staging import Stager
    from unidad_dist.methods.unidad import UniDAD
    from unidad_dist.parallel import engines
    from unidad_dist.train import checkpoint
    from unidad_dist.train.build import build

    cfg = make_cfg()
    models = build(cfg, rt)
    engines.attach(models, cfg, rt)
    method = UniDAD(cfg, models, rt)
    run = tmp_path / "run"
    checkpoint.save(run, models, 1, rt, method, keep=5)
    gate = checkpoint.PublishGate()
    publish = checkpoint.stage(run, models, 2, rt, method, keep=5, stager=Stager(), gate=gate)
    gate.cancel()
    with pytest.raises(OSError, match="iter_0000002 was not published: abandoned"):
        publish()
    assert checkpoint.latest_complete(run).name == "iter_0000001" and not (run / "checkpoints" / "iter_0000002").exists()

    real = checkpoint._publish

    def full(tmp, final, *a):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "_publish", full)
    publish = checkpoint.stage(run, models, 3, rt, method, keep=5, stager=Stager(), gate=checkpoint.PublishGate())
    with pytest.raises(OSError, match="iter_0000003 was not published: rank 0: OSError.*No space left") as e:
        publish()
    assert e.value.errno == errno.ENOSPC  # the loop turns it into its one-line "cannot write" error
    monkeypatch.setattr(checkpoint, "_publish", real)
    publish = checkpoint.stage(run, models, 4, rt, method, keep=5, stager=Stager(), gate=checkpoint.PublishGate())
    assert publish().name == "iter_0000004" and checkpoint.latest_complete(run).name == "iter_0000004"


def test_ray_reports_a_late_checkpoint_with_its_own_iterations_logs(monkeypatch):
    ray_train = pytest.importorskip("ray.train")
    from unidad_dist.launch.ray_train import RayReport

    sent = []
    monkeypatch.setattr(ray_train, "report", lambda metrics, **kw: sent.append(metrics))
    hook = RayReport()
    for it in range(6):  # iterations 0..5: done = 1..6
        hook.on_step_end(None, it, {"loss": float(it), "name": "x"})
    hook.on_checkpoint(None, __import__("pathlib").Path("/r/checkpoints/iter_0000004"), 4)  # reported at 6
    hook.on_checkpoint(None, __import__("pathlib").Path("/r/checkpoints/iter_0000006"), 6)
    assert sent == [{"iteration": 4, "loss": 3.0}, {"iteration": 6, "loss": 5.0}]
