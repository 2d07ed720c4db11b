import pytest

from unidad_dist.config import Config, all_keys, config_from_dict, load_config, parse_overrides
from unidad_dist.errors import UserError

BASE = {"source_teacher": {"backbone": "/somewhere"}, "data": {"target": {"path": "/shots"}}}


def _cfg(**sections):
    data = {k: dict(v) for k, v in BASE.items()}
    for k, v in sections.items():
        data[k] = {**data.get(k, {}), **v}
    return config_from_dict(data)


def test_recipe_and_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("source_teacher: {backbone: /m}\ndata: {target: {path: /s}}\n"
                      "student: {optimizer: {lr: 1e-4}}\ntrain: {iterations: 7}\n")
    cfg = load_config(recipe, ["train.iterations=9", "student.steps=3", "algorithm.a=0"])
    assert cfg.train.iterations == 9 and cfg.student.steps == 3
    assert cfg.student.optimizer.lr == pytest.approx(1e-4)  # "1e-4" is a float, not a string
    assert cfg.run.name == "r"  # derived from the recipe file name
    assert isinstance(cfg, Config)


@pytest.mark.parametrize("key,bad,close", [("studnet.steps", "studnet", "student"),
                                           ("train.iteration", "train.iteration", "train.iterations"),
                                           ("algorithm.aa", "algorithm.aa", "algorithm.a")])
def test_unknown_key_names_closest(key, bad, close):
    with pytest.raises(UserError, match=rf"unknown config key '{bad}'; did you mean '{close}'"):
        config_from_dict({**BASE, **parse_overrides([f"{key}=1"])})


@pytest.mark.parametrize("override,msg", [
    ("train.iterations=ten", "train.iterations: expected int"),
    ("train.iterations=1.5", "train.iterations: expected int"),
    ("student.strict=3", "student.strict: expected bool"),
    ("student.timesteps=5", "student.timesteps: expected list"),
    ("algorithm.a=1.5", r"algorithm.a must be in \[0, 1\]"),
    ("algorithm.a=-0.1", r"algorithm.a must be in \[0, 1\]"),
    ("algorithm.a=sometimes", r"algorithm.a must be a number in \[0, 1\] \(or .auto.\)"),
    ("algorithm.a=auto", r"algorithm.a=auto .* target_teacher.mode=off; set target_teacher.mode=online"),
    ("student.steps=0", "student.steps must be >= 1"),
    ("student.precision=fp8", "student.precision='fp8' is not one of"),
    ("student.zero_stage=4", "student.zero_stage=4 is not a valid ZeRO stage 0-3"),
    ("fake_teacher.zero_stage=-1", "fake_teacher.zero_stage=-1 is not a valid ZeRO stage"),
    ("source_teacher.zero_stage=2", r"a frozen teacher is 0 \(replicated\) or 3"),
    ("student.offload_optimizer=true", "offload_optimizer needs ZeRO"),
    ("placement.mode=spread", "placement.mode=.spread. is not one of colocated, split"),
])
def test_bad_values(override, msg):
    data = {**BASE}
    tree = parse_overrides([override])
    for k, v in tree.items():
        data[k] = {**data.get(k, {}), **v}
    with pytest.raises(UserError, match=msg):
        config_from_dict(data)


def test_target_weight_needs_target_teacher():
    with pytest.raises(UserError, match="needs a target teacher"):
        _cfg(algorithm={"a": 0.5}, target_teacher={"mode": "off"})
    _cfg(algorithm={"a": 0.5}, target_teacher={"mode": "online"})


def test_source_weight_needs_source_teacher():
    with pytest.raises(UserError, match="needs the source teacher"):
        _cfg(algorithm={"a": 0.5}, target_teacher={"mode": "online"}, source_teacher={"enabled": False})
    _cfg(algorithm={"a": 1.0}, target_teacher={"mode": "online"}, source_teacher={"enabled": False})


def test_timesteps_must_match_steps():
    with pytest.raises(UserError, match="student.timesteps has 2 entries"):
        _cfg(student={"steps": 3, "timesteps": [999, 500]})
    with pytest.raises(UserError, match="strictly decreasing"):
        _cfg(student={"steps": 2, "timesteps": [500, 999]})


def test_missing_recipe_and_bad_yaml(tmp_path):
    with pytest.raises(UserError, match="recipe file .* not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(bad)


def test_off_is_a_string_not_false(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("source_teacher: {backbone: /m}\ndata: {target: {path: /s}}\ntarget_teacher: {mode: off}\n")
    assert load_config(recipe).target_teacher.mode == "off"
    cfg = load_config(recipe, ["target_teacher.mode=online", "algorithm.a=0.5", "logging.wandb=true"])
    assert cfg.target_teacher.mode == "online" and cfg.logging.wandb is True
    assert load_config(recipe, ["target_teacher.mode=off"]).target_teacher.mode == "off"


def test_override_syntax():
    with pytest.raises(UserError, match="key.sub=value"):
        parse_overrides(["train.iterations"])


def test_public_names_exist():
    keys = set(all_keys())
    for k in ("run.dir", "run.seed", "train.iterations", "checkpoint.every", "algorithm.a", "student.steps",
              "data.target.path"):
        assert k in keys


def test_recipes_in_repo_validate(repo_root):
    from unidad_dist.launch.chain import is_chain, load_chain

    for recipe in sorted((repo_root / "recipes").glob("*.yaml")):
        load_chain(recipe) if is_chain(recipe) else load_config(recipe)  # a chain: every stage is checked


@pytest.mark.parametrize("overrides, msg", [
    (["train.global_batch_size=0"], "train.global_batch_size must be >= 1"),
    (["train.global_batch_size=8", "fake_teacher.grad_accum=2"], "remove fake_teacher.grad_accum=2"),
])
def test_global_batch_size_conflicts(overrides, msg):
    data = {**BASE}
    for k, v in parse_overrides(overrides).items():
        data[k] = {**data.get(k, {}), **v}
    with pytest.raises(UserError, match=msg):
        config_from_dict(data)


def test_global_batch_size_is_split_into_micro_batches_and_accumulation():
    from unidad_dist.config import batch_for_world

    data = {**BASE, "train": {**BASE.get("train", {}), "global_batch_size": 12, "batch_size": 4}}
    cfg = config_from_dict(data)
    got = {w: (c.train.batch_size, c.student.grad_accum, c.fake_teacher.grad_accum)
           for w in (1, 2, 3, 4, 6, 12) for c in [batch_for_world(cfg, w)]}
    # per rank 12 / w samples, in the fewest micro-batches of at most 4 that divide it evenly
    assert got == {1: (4, 3, 3), 2: (3, 2, 2), 3: (4, 1, 1), 4: (3, 1, 1), 6: (2, 1, 1), 12: (1, 1, 1)}
    assert cfg.train.batch_size == 4 and cfg.student.grad_accum == 1  # the recipe's own config is untouched
    with pytest.raises(UserError, match=r"cannot be split over 5 ranks; run on 1, 2, 3, 4, 6, 12 ranks"):
        batch_for_world(cfg, 5)
    cfg = config_from_dict({**BASE})
    assert batch_for_world(cfg, 3) is cfg
    # split placement: each side holds the whole batch over half the ranks
    split = config_from_dict({**data, "placement": {"mode": "split"}})
    got = {w: (c.train.batch_size, c.student.grad_accum) for w in (2, 4, 6) for c in [batch_for_world(split, w)]}
    assert got == {2: (4, 3), 4: (3, 2), 6: (4, 1)}
    with pytest.raises(UserError, match=r"over 10 ranks \(5 per side of split placement\); run on 2, 4, 6, 8, 12, 24"):
        batch_for_world(split, 10)
