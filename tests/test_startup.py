"""A new user's first minutes (issue 13 §2): commands start without loading torch, and starting DeepSpeed
JIT-builds nothing (its CPU shared-memory comm op served only inference, and took minutes per cache)."""
import os
import subprocess
import sys
import textwrap

import pytest

COMMANDS = ["train", "demo", "config", "sample", "launch", "plan", "make-shards", "export", "recipes", "status",
            "report"]


def test_help_of_every_command_loads_no_heavy_library():
    code = textwrap.dedent(f"""
        import contextlib, io, sys
        from unidad_dist.cli import main
        for cmd in [None] + {COMMANDS!r}:
            with contextlib.redirect_stdout(io.StringIO()):
                try:
                    main(["--help"] if cmd is None else [cmd, "--help"])
                except SystemExit as e:
                    assert e.code == 0, (cmd, e.code)
        heavy = sorted(m for m in ("torch", "deepspeed", "diffusers", "transformers", "yaml") if m in sys.modules)
        print(heavy)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", r.stdout


def test_init_distributed_builds_no_op(tmp_path):
    ext = tmp_path / "ext"
    code = textwrap.dedent("""
        from unidad_dist.device import runtime_from_env
        from unidad_dist.parallel import engines
        rt = runtime_from_env()
        engines.init_distributed(rt)
        import deepspeed.comm.comm as c
        print(c.cdb.shm_comm_op is None)
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env.update(TORCH_EXTENSIONS_DIR=str(ext), DS_BUILD_OPS="0")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "True", r.stdout
    assert not ext.exists() or not any(ext.rglob("*.so")), sorted(ext.rglob("*"))


def test_the_extension_cache_is_the_projects_unless_set(monkeypatch, tmp_path):
    from unidad_dist import device

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setenv("UNIDAD_CACHE", str(tmp_path / "cache"))
    device.prepare_deepspeed_env()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(tmp_path / "cache" / "torch_extensions")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/somewhere/else")
    device.prepare_deepspeed_env()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == "/somewhere/else"


@pytest.mark.parametrize("world", ["1", "2"])
def test_a_process_that_had_a_process_group_exits_without_finalisation_after_running_its_exit_work(tmp_path, world):
    """entry(): in a process that had a process group (a launched rank, or one rank's private group) the
    interpreter's finalisation is skipped — there gloo's worker threads, dropping a finished collective's
    tensors, took the GIL and aborted the rank after a successful command — but what finalisation would have
    run that matters still runs: our non-daemon threads finish, the atexit handlers run, stdout is flushed; the
    exit code is the command's. Without a process group the exit is the ordinary one."""
    code = textwrap.dedent(f"""
        import atexit, os, sys, threading, time
        from pathlib import Path
        d = Path({str(tmp_path)!r})
        os.environ["WORLD_SIZE"] = {world!r}
        import torch.distributed as dist
        if {world!r} == "1" and sys.argv[1] == "group":
            dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
        from unidad_dist import cli

        class Finalised:
            def __del__(self):
                (d / "finalised").write_text("yes")
        keep = Finalised()  # a module global: collected only by the interpreter's finalisation
        atexit.register(lambda: (d / "atexit").write_text("yes"))
        threading.Thread(target=lambda: (time.sleep(0.3), (d / "thread").write_text("yes"))).start()
        cli.main = lambda argv=None: 3
        print("unflushed", end="")
        cli.entry()
    """)
    for how in (["group"] if world == "1" else []) + ["plain"]:
        for f in ("finalised", "atexit", "thread"):
            (tmp_path / f).unlink(missing_ok=True)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout to a pipe: buffered
        r = subprocess.run([sys.executable, "-c", code, how], capture_output=True, text=True, env=env)
        assert r.returncode == 3 and r.stdout == "unflushed", (how, r.returncode, r.stdout, r.stderr)
        assert (tmp_path / "atexit").exists() and (tmp_path / "thread").exists(), how
        skipped = world == "2" or how == "group"
        assert (tmp_path / "finalised").exists() is not skipped, how
