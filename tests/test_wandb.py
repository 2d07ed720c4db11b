"""wandb (issue 14 §3): one wandb run per run folder, continued by every later process; the same records as
metrics.jsonl; rank 0 only; offline mode; wandb missing -> one clear error.

The offline files are read with a small reader of the ``.wandb`` transaction log (the LevelDB log format: a
7-byte header ``:W&B`` + magic + version, then 32 KiB blocks of chunks ``crc32 | length | type | data``, each
whole record a ``wandb_internal_pb2.Record``): wandb 0.31 ships no Python reader of its own.
"""
import json
import re
import shutil
import struct
import sys
import time
import types
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from unidad_dist import testing
from unidad_dist.cli import main
from unidad_dist.errors import UserError
from unidad_dist.train.hooks import Metrics
from unidad_dist.train.logging import WANDB_STATE, RunLogger

WANDB_OWN = {"_step", "_runtime", "_timestamp"}


def wandb_records(path: Path):
    """Every record of an offline run's ``run-<id>.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a .wandb file"
    block, pos, buf = 32768, 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            pos += left
            continue
        buf += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # FULL, LAST
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            yield rec


def _items(items) -> dict:
    """A record's items as a dict: a nested key (an image's fields) becomes nested dicts."""
    out = {}
    for i in items:
        path = [i.key] if i.key else list(i.nested_key)
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = json.loads(i.value_json)
    return out


def _complete_records(path: Path, timeout_s: float = 60.0) -> list:
    """The records of a ``.wandb`` file once its writer has finished it (its last record is ``exit``). wandb's
    service process can still be writing it when ``finish()`` has returned: a CI run read one with no ``run``
    record yet, and the same file held every record a moment later."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            recs = list(wandb_records(path))
        except Exception:  # noqa: BLE001 - a record cut off mid-write does not parse yet
            recs = []
        if recs and recs[-1].WhichOneof("record_type") == "exit":
            return recs
        if time.monotonic() > deadline:
            raise AssertionError(f"{path}: no exit record {timeout_s:.0f} s after the run finished "
                                 f"(records: {[r.WhichOneof('record_type') for r in recs]})")
        time.sleep(0.2)


def read_offline_run(folder: Path) -> dict:
    """run (id, project), config, history {step: {key: value}}, summary {key: value} of one offline-run folder."""
    files = list(folder.glob("run-*.wandb"))
    assert len(files) == 1, files
    out = {"history": {}, "summary": {}, "config": {}}
    for rec in _complete_records(files[0]):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out["run"] = rec.run
            out["config"].update(_items(rec.run.config.update))
        elif kind == "config":
            out["config"].update(_items(rec.config.update))
        elif kind == "history":
            out["history"][rec.history.step.num] = _items(rec.history.item)
        elif kind == "summary":
            out["summary"].update(_items(rec.summary.update))
    return out


def _image(v) -> bool:
    return isinstance(v, dict) and v.get("_type") == "image-file"


def _write_recipe(tmp_path, pipes, **over) -> tuple[Path, Path]:
    rec = testing.tiny_recipe(pipes["pixel"], pipes["shots"], tmp_path / "run", **over)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(rec))
    return path, Path(rec["run"]["dir"])


@pytest.fixture
def offline(monkeypatch, tmp_path):
    for var in ("WANDB_RUN_ID", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RESUME", "WANDB_NAME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))  # not used: a run's files stay in its folder


def test_offline_run_is_continued_after_a_move_with_the_records_of_metrics_jsonl(tmp_path, pipes, offline):
    """Train 1 iteration, move the run folder, resume it to 2: both processes log to the one wandb run whose id
    the folder stores; every metrics.jsonl record is a wandb history row at step = iteration with the same keys
    and values; the grids are images; the resolved config, the run folder and the evaluation are there."""
    recipe, rdir = _write_recipe(tmp_path, pipes, **{"logging.wandb": True, "logging.every": 1,
                                                    "logging.sample_every": 1, "train.iterations": 1,
                                                    "target_teacher.mode": "off", "algorithm.a": 0.0})
    assert main(["train", "--config", str(recipe)]) == 0
    state = json.loads((rdir / WANDB_STATE).read_text())
    assert state["project"] == "unidad_dist" and len(state["id"]) == 8
    moved = tmp_path / "moved"
    shutil.move(str(rdir), str(moved))
    assert main(["train", "--config", str(recipe), f"run.dir={moved}", "train.iterations=2"]) == 0
    assert json.loads((moved / WANDB_STATE).read_text()) == state
    assert not (tmp_path / "wandb_dir").exists() or not any((tmp_path / "wandb_dir").iterdir())

    folders = sorted((moved / "wandb").glob("offline-run-*"))
    # wandb names a folder offline-run-<second>-<id>, with -1, -2, ... when that name exists (both runs can start
    # within one second)
    named = re.compile(rf"offline-run-\d{{8}}_\d{{6}}-{state['id']}(-\d+)?")
    assert len(folders) == 2 and all(named.fullmatch(f.name) for f in folders), folders
    first, second = (read_offline_run(f) for f in folders)
    for run, where in ((first, rdir), (second, moved)):
        assert run["run"].run_id == state["id"] and run["run"].project == state["project"]
        assert run["config"]["run_folder"] == str(where.resolve())
        assert run["config"]["algorithm"]["a"] == 0.0 and run["config"]["logging"]["wandb"] is True
    assert first["config"]["train"]["iterations"] == 1 and second["config"]["train"]["iterations"] == 2

    lines = [json.loads(line) for line in (moved / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in lines] == [0, 1]
    for rec in lines:
        run = first if rec["iteration"] < 1 else second
        row = run["history"][rec["iteration"]]
        scalars = {k: v for k, v in row.items() if k not in WANDB_OWN and not _image(v)}
        assert scalars == rec, rec["iteration"]  # the same keys and values
        assert _image(row["samples"])  # logging.sample_every=1: that iteration's grid
    assert _image(first["history"][0]["eval/student_before"]) and _image(first["history"][0]["eval/target_shots"])
    assert _image(first["history"][1]["eval/student_after"]) and _image(second["history"][2]["eval/student_after"])
    assert set(first["history"]) == {0, 1} and set(second["history"]) == {1, 2}
    for f in folders:
        assert list((f / "files" / "media" / "images").glob("*.png"))

    summary = json.loads((moved / "summary.json").read_text())
    before = json.loads((moved / "eval_before.json").read_text())
    assert second["summary"]["eval/proxy_distance_after"] == pytest.approx(summary["proxy_distance_after"])
    assert second["summary"]["eval/wall_time_s/train_s"] == pytest.approx(summary["wall_time_s"]["train_s"])
    assert second["summary"]["eval_before/proxy_distance"] == pytest.approx(before["proxy_distance"])


# --- RunLogger against a stand-in wandb module (no wandb process): the decisions the offline run cannot show


class FakeRun:
    def __init__(self, id, resumed=False, step=0, entity=""):
        self.id, self.resumed, self.step, self.entity, self.disabled = id, resumed, step, entity, False
        self.logged, self.config, self.summary, self.finished = [], {}, {}, False

    def log(self, values, step=None):
        self.logged.append((step, dict(values)))

    def finish(self):
        self.finished = True


class FakeConfig(dict):
    def update(self, values, allow_val_change=False):
        super().update(values)


def fake_wandb(monkeypatch, resumed=False, step=0, fail=None):
    errors = types.SimpleNamespace(Error=type("Error", (Exception,), {}))
    calls = []

    def init(**kw):
        calls.append(kw)
        if fail:
            raise errors.Error(fail)
        run = FakeRun(kw["id"], resumed, step)
        run.config = FakeConfig()
        return run

    module = types.ModuleType("wandb")
    module.init, module.errors, module.calls = init, errors, calls
    module.Image = lambda path: {"image": path}
    monkeypatch.setitem(sys.modules, "wandb", module)
    for var in ("WANDB_RUN_ID", "WANDB_PROJECT", "WANDB_ENTITY"):
        monkeypatch.delenv(var, raising=False)
    return module


@pytest.fixture
def wcfg(make_cfg):
    return make_cfg(**{"logging.wandb": True})


def test_the_stored_id_is_continued_and_a_conflicting_one_refused(tmp_path, wcfg, monkeypatch):
    wb = fake_wandb(monkeypatch)
    RunLogger(tmp_path, wcfg, True, 10, 0).close()
    state = json.loads((tmp_path / WANDB_STATE).read_text())
    assert wb.calls[0]["id"] == state["id"] and wb.calls[0]["resume"] == "allow"
    assert wb.calls[0]["dir"] == str(tmp_path) and wb.calls[0]["project"] == "unidad_dist"
    monkeypatch.setenv("WANDB_PROJECT", "elsewhere")  # a later process: the stored run wins
    RunLogger(tmp_path, wcfg, True, 10, 5).close()
    assert wb.calls[1]["id"] == state["id"] and wb.calls[1]["project"] == "unidad_dist"
    monkeypatch.setenv("WANDB_RUN_ID", "other123")
    with pytest.raises(UserError, match="WANDB_RUN_ID=other123 but run folder"):
        RunLogger(tmp_path, wcfg, True, 10, 5)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    RunLogger(fresh, wcfg, True, 10, 0).close()  # a new run takes WANDB_RUN_ID and WANDB_PROJECT
    assert json.loads((fresh / WANDB_STATE).read_text())["id"] == "other123" and wb.calls[-1]["project"] == "elsewhere"


def test_a_resumed_run_sends_each_iteration_once(tmp_path, wcfg, monkeypatch):
    """A killed process wrote iterations 0-5 to metrics.jsonl, but wandb holds only 0-1 (step 2 next); the
    checkpoint is at 4. The new process sends 2-3 from the file, then its own from 4 on — none below wandb's step."""
    (tmp_path / WANDB_STATE).write_text(json.dumps({"id": "abcd1234", "project": "p", "entity": None}))
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"iteration": i, "x/loss": float(i)}) + "\n"
                                                    for i in range(6)))
    fake_wandb(monkeypatch, resumed=True, step=2)
    logger = RunLogger(tmp_path, wcfg, True, 10, 4)
    for it in (4, 5):
        logger.log(it, {"x/loss": float(it)})
    logger.image("samples", tmp_path / "g.png", 5)
    assert [s for s, _ in logger.wandb.logged] == [2, 3, 4, 5, 5]
    assert logger.wandb.logged[0][1] == {"iteration": 2, "x/loss": 2.0}
    # wandb already holds more than the checkpoint: the iterations run again are not sent
    fake_wandb(monkeypatch, resumed=True, step=6)
    logger = RunLogger(tmp_path, wcfg, True, 10, 4)
    for it in range(4, 8):
        logger.log(it, {"x/loss": float(it)})
    logger.image("samples", tmp_path / "g.png", 5)
    assert [s for s, _ in logger.wandb.logged] == [6, 7]


def test_only_rank_0_logs(tmp_path, wcfg, monkeypatch):
    wb = fake_wandb(monkeypatch)
    run = types.SimpleNamespace(dir=tmp_path, cfg=wcfg, rt=types.SimpleNamespace(is_main=False))
    hook = Metrics()
    hook.on_train_start(run, 0)
    hook.logger.log(0, {"x/loss": 1.0})
    hook.logger.image("samples", tmp_path / "g.png", 0)
    hook.logger.summary({"a": 1.0}, "eval/")
    hook.close(run)
    assert wb.calls == [] and not any(tmp_path.iterdir())
    run.rt.is_main = True
    hook.on_train_start(run, 0)
    hook.logger.log(0, {"x/loss": 1.0})
    assert len(wb.calls) == 1 and hook.logger.wandb.logged[0][0] == 0


def test_wandb_missing_or_failing_is_one_clear_error(tmp_path, wcfg, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(UserError, match=r"logging.wandb=true but wandb is not installed; pip install"):
        RunLogger(tmp_path, wcfg, True, 10, 0)
    fake_wandb(monkeypatch, fail="No API key configured. Use `wandb login` to log in.")
    with pytest.raises(UserError, match=r"wandb could not start \(Error: No API key.*WANDB_MODE=offline"):
        RunLogger(tmp_path, wcfg, True, 10, 0)
    assert (tmp_path / WANDB_STATE).is_file()  # stored before wandb.init: a retry continues the same run
    off = replace(wcfg, logging=replace(wcfg.logging, wandb=False))  # off: wandb is never imported
    RunLogger(tmp_path / "off", off, True, 10, 0).close()
    assert not (tmp_path / "off").exists()


def assert_one_wandb_run(rdir: Path, starts: int) -> None:
    """The offline wandb files of a run that started ``starts`` times (any launcher): one folder per start, all
    of them the run whose id the run folder stores, and every metrics.jsonl iteration is a history row."""
    state = json.loads((rdir / WANDB_STATE).read_text())
    folders = sorted((rdir / "wandb").glob("offline-run-*"))
    assert len(folders) == starts, folders
    runs = [read_offline_run(f) for f in folders]
    assert {r["run"].run_id for r in runs} == {state["id"]}
    assert all(r["config"]["run_folder"] == str(rdir.resolve()) for r in runs)
    steps = set().union(*(r["history"] for r in runs))
    iterations = {json.loads(line)["iteration"] for line in (rdir / "metrics.jsonl").read_text().splitlines()}
    assert iterations <= steps, (sorted(iterations), sorted(steps))
