"""OPAD (issue 17 §1, docs/algorithm.md §12): teacher and student trained jointly on one shared text encoder,
only cross-attention K/V training; the teacher step changes no student weight and vice versa, the discriminator
step neither; the student's alignment loss is measured against the teacher's x̂0 of its own forward-diffused
sample; the collaborative phase; bit-identical resume; split placement; bad input."""
import json

import pytest
import torch
import torch.nn.functional as F
import yaml

from unidad_dist import testing
from unidad_dist.cli import main
from unidad_dist.core.draws import SampleDraws
from unidad_dist.errors import UserError


def _recipe(pipe, shots, run_dir, **over) -> dict:
    rec = {
        "run": {"name": "opad", "dir": str(run_dir), "seed": 0},
        "train": {"iterations": 2, "batch_size": 2},
        "algorithm": {"name": "opad", "features": "stand_in", "w_adv": 0.5},
        "concept_teacher": {"backbone": str(pipe), "precision": "fp32", "sample_steps": 3,
                    "optimizer": {"lr": 1e-2, "warmup": 0}},
        "student": {"precision": "fp32", "optimizer": {"lr": 1e-2, "warmup": 0}},
        "discriminator": {"precision": "fp32", "optimizer": {"lr": 1e-2, "warmup": 0}},
        "data": {"target": {"path": str(shots), "class_name": "cat"}},
        "logging": {"progress": False, "grid_size": 4},
        "eval": {"num_samples": 4},
    }
    return testing.apply_overrides(rec, over)


def _cfg(pipes, tmp_path, form="sd15", **over):
    from unidad_dist.config import config_from_dict

    return config_from_dict(_recipe(pipes[form], pipes["shots"], tmp_path / "run", **over))


def _method(cfg, rt):
    from unidad_dist.methods.opad import OPAD
    from unidad_dist.parallel import engines
    from unidad_dist.train.build import build

    models = build(cfg, rt)
    engines.attach(models, cfg, rt)
    return OPAD(cfg, models, rt), models


def _weights(models) -> dict:
    return {r: {k: v.detach().clone() for k, v in role.module.state_dict().items()} for r, role in models.roles.items()}


def _changed(before: dict, after: dict) -> dict:
    return {r: sorted(k for k in before[r] if not torch.equal(before[r][k], after[r][k])) for r in before}


def _kv(name: str) -> bool:
    return ".attn2.to_k." in name or ".attn2.to_v." in name


def test_each_step_moves_only_its_own_role_and_only_cross_attention_kv(pipes, tmp_path, rt):
    """Teacher step: teacher K/V only; student step: student K/V only; discriminator step: its heads only."""
    cfg = _cfg(pipes, tmp_path)
    m, models = _method(cfg, rt)
    steps, stray = [], []

    def grads(role):
        return [n for n, p in models.roles[role].module.named_parameters() if p.grad is not None and p.grad.any()]

    for name in ("concept_teacher", "student", "discriminator"):
        orig = models.roles[name].step

        def spy(it, name=name, orig=orig):
            steps.append((name, _weights(models)))
            if name == "student":  # the student's backward put no gradient into the teacher or the discriminator
                stray.extend(grads("concept_teacher") + grads("discriminator"))
            return orig(it)

        models.roles[name].step = spy
    before = _weights(models)
    logs = m.step(0)
    after = _weights(models)
    assert [s[0] for s in steps] == ["concept_teacher", "student", "discriminator"]
    assert stray == []
    # between the teacher's step and the student's step only the teacher changed, and so on
    snaps = [s[1] for s in steps] + [after]
    expect = {"concept_teacher": 1, "student": 2, "discriminator": 3}
    for role, k in expect.items():
        for j in range(1, 4):
            ch = _changed(snaps[j - 1], snaps[j])
            if j == k:
                assert ch[role], f"{role} did not change in its own step"
            else:
                assert not ch[role], f"{role} changed in step {j}: {ch[role][:3]}"
    ch = _changed(before, after)
    assert ch["concept_teacher"] and all(_kv(k) for k in ch["concept_teacher"])
    assert ch["student"] and all(_kv(k) for k in ch["student"])
    assert ch["discriminator"] and all(k.startswith("heads.") for k in ch["discriminator"])
    trainable = [n for n, p in models.roles["student"].module.named_parameters() if p.requires_grad]
    assert trainable and all(_kv(n) for n in trainable)
    for key in ("concept_teacher/denoise", "student/mse", "student/lpips", "student/identity", "student/adv",
                "discriminator/gan_d"):
        assert key in logs, key


TOKEN = {"algorithm.train_token": True, "data.target.rare_token": "<new1>"}


def _fresh_encoder(pipe, form="sd15", name="text_encoder"):
    """The pipeline's encoder and tokenizer as saved (no new token)."""
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel
    return (AutoTokenizer.from_pretrained(str(pipe / name.replace("text_encoder", "tokenizer"))),
            cls.from_pretrained(str(pipe / name)).eval())


def _hidden_with_row(pipe, prompts, row):
    """encoder_hidden_states of prompts holding <new1>, computed apart: the saved encoder's table resized by one
    row set to ``row``, the tokenizer told of the token."""
    tok, enc = _fresh_encoder(pipe)
    tok.add_tokens(["<new1>"])
    enc.resize_token_embeddings(max(len(tok), enc.config.vocab_size))
    with torch.no_grad():
        enc.get_input_embeddings().weight[tok.convert_tokens_to_ids("<new1>")] = row.reshape(-1)
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
        return enc(ids).last_hidden_state


def test_a_new_tokens_embedding_trains_with_the_teacher_and_every_role_reads_it(pipes, tmp_path, rt):
    """algorithm.train_token: the rare token is a new token of the one shared encoder, starting from the class
    name's embedding; the teacher's step trains it (with its K/V) and nothing else of the encoder; the student's
    step reads the value the teacher's step left (its conditions, recomputed apart) and changes it not."""
    cfg = _cfg(pipes, tmp_path, **TOKEN, **{"concept_teacher.optimizer.weight_decay": 0.0})  # it moves by its gradient
    m, models = _method(cfg, rt)
    text, teacher = models.text, models.roles["concept_teacher"]
    tok0, enc0 = _fresh_encoder(pipes["sd15"])
    table0 = enc0.get_input_embeddings().weight.detach()
    init = table0[tok0("cat", add_special_tokens=False).input_ids].mean(0)
    assert text.tokenizers[0].convert_tokens_to_ids("<new1>") == len(tok0)
    torch.testing.assert_close(text.token_rows()[0].reshape(-1), init)
    torch.testing.assert_close(teacher.read_params("tokens.")[0].reshape(-1), init)
    seen = {}
    orig = models.roles["student"].output

    def spy(x_t, t, cond, module=None):
        seen.setdefault("cond", cond["encoder_hidden_states"].detach().clone())
        seen.setdefault("rows", text.token_rows()[0].clone())
        return orig(x_t, t, cond, module)

    models.roles["student"].output = spy
    before = _weights(models)
    m.step(0)
    ch = _changed(before, _weights(models))
    assert "tokens.weights.0" in ch["concept_teacher"] and all(_kv(k) or k == "tokens.weights.0"
                                                                for k in ch["concept_teacher"])
    assert ch["student"] and all(_kv(k) for k in ch["student"])
    trained = teacher.read_params("tokens.")[0]
    assert not torch.equal(trained.reshape(-1), init)
    assert torch.equal(seen["rows"], trained) and torch.equal(text.token_rows()[0], trained)
    torch.testing.assert_close(text._tables()[0].base.weight, table0)  # the pretrained rows stay as they were
    assert not any(p.requires_grad for p in text.parameters())  # the teacher's row never became the encoder's
    prompts = models.data.prompts
    assert all("<new1>" in p for p in prompts)
    want = _hidden_with_row(pipes["sd15"], prompts, trained)
    got = seen["cond"]
    assert got.shape[0] % len(prompts) == 0 or len(prompts) == 1
    # the student's first micro-batch: its prompts are drawn from the concept prompts (here one)
    torch.testing.assert_close(got, want[:1].expand_as(got), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, _hidden_with_row(pipes["sd15"], prompts, init)[:1].expand_as(got), atol=1e-6)


def test_the_new_token_trains_in_bf16_autocast_with_accumulation_and_is_a_word_of_its_own(pipes, tmp_path, rt):
    """A bf16-autocast teacher over 2 micro-batches moves the token and leaves the shared encoder holding its
    value; the token matches as a whole word only, and cached prompts holding it in any case are re-encoded."""
    over = {**TOKEN, "data.target.rare_token": "sks", "concept_teacher.precision": "bf16_autocast",
            "concept_teacher.grad_accum": 2, "concept_teacher.optimizer.weight_decay": 0.0}
    m, models = _method(_cfg(pipes, tmp_path, **over), rt)
    text, teacher = models.text, models.roles["concept_teacher"]
    init = text.token_rows()[0].clone()
    seen = []
    tokens = teacher.module.tokens
    orig = tokens.forward
    tokens.forward = lambda cond: seen.append((cond, orig(cond))) or seen[-1][1]
    m.step(0)
    assert len(seen) == 2  # one encoding per micro-batch, in fp32 as the shared encoder's (not under autocast)
    with torch.no_grad():
        for cond, out in seen:
            torch.testing.assert_close(out["encoder_hidden_states"], text.encode_ids(cond, [init])["encoder_hidden_states"],
                                       rtol=1e-6, atol=1e-6)
    trained = teacher.read_params("tokens.")[0]
    assert not torch.equal(trained, init) and torch.equal(text.token_rows()[0], trained)
    new_id = text.tokenizers[0].convert_tokens_to_ids("sks")
    ids = text.tokenize(["she asks for tasks", "a sks cat"])["input_ids"]
    assert new_id not in ids[0].tolist() and new_id in ids[1].tolist()
    models.data.encode(["a SKS cat"])
    models.data.forget("sks")
    assert "a SKS cat" not in models.data._cache


def test_a_run_whose_captions_hold_the_token_samples_without_them(pipes, tmp_path, rt):
    """Sampling builds the data without the shots: the check that a concept prompt holds the new token is a
    training check, so sample/export work when only the shots' captions held it."""
    from unidad_dist.methods.opad import OPAD
    from unidad_dist.train.build import build

    cfg = _cfg(pipes, tmp_path, **{**TOKEN, "data.target.prompt": "a photo of a {cls}"})
    models = build(cfg, rt, roles={"student"}, checks=False, sampling_prompts=["a <new1> cat"])
    OPAD(cfg, models, rt)


def test_sdxl_pools_at_the_end_of_text_with_a_new_token(pipes, tmp_path, rt):
    """SDXL form: both encoders get the token; the pooled embedding is read at the end-of-text position, not at
    the largest id (the new token's) as transformers does for configs with the legacy eos_token_id 2 (SDXL's)."""
    import shutil

    from unidad_dist.config import config_from_dict
    from unidad_dist.train.build import build

    pipe = tmp_path / "sdxl"
    shutil.copytree(pipes["sdxl"], pipe)
    for name in ("text_encoder", "text_encoder_2"):
        f = pipe / name / "config.json"
        f.write_text(json.dumps({**json.loads(f.read_text()), "eos_token_id": 2}))
    cfg = config_from_dict(_recipe(pipe, pipes["shots"], tmp_path / "run", **TOKEN))

    text = build(cfg, rt).text
    assert len(text.token_rows()) == 2
    cond = text.encode(["a <new1> cat"])
    tok, enc = _fresh_encoder(pipe, "sdxl", "text_encoder_2")
    tok.add_tokens(["<new1>"])
    enc.resize_token_embeddings(max(len(tok), enc.config.vocab_size))
    with torch.no_grad():
        enc.get_input_embeddings().weight[tok.convert_tokens_to_ids("<new1>")] = text.token_rows()[1].reshape(-1)
        ids = tok(["a <new1> cat"], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
        h = enc(ids, output_hidden_states=True).last_hidden_state
        eos = int((ids[0] == tok.eos_token_id).nonzero()[0])
        want = enc.text_projection(h[0, eos])
    torch.testing.assert_close(cond["added_cond_kwargs"]["text_embeds"][0], want)


@pytest.mark.parametrize("over,needle", [
    ({"data.target.rare_token": "a"}, "already a token"),
    ({"data.target.rare_token": ""}, "rare_token"),
    ({"data.target.prompt": "a photo of a {cls}"}, "no concept prompt holds"),
])
def test_a_new_token_that_cannot_train_is_refused(pipes, tmp_path, rt, over, needle):
    with pytest.raises(UserError, match=needle):
        _method(_cfg(pipes, tmp_path, **{**TOKEN, **over}), rt)


def test_one_text_encoder_serves_teacher_and_student(pipes, tmp_path, rt):
    """Both roles' conditions come from the one text conditioner (one module object); the run has no second
    copy of the encoder."""
    cfg = _cfg(pipes, tmp_path)
    m, models = _method(cfg, rt)
    conds = {}
    for name in ("concept_teacher", "student"):
        role = models.roles[name]
        for attr in ("train_forward", "forward"):
            orig = getattr(role, attr)

            def spy(x_t, t, cond, *a, name=name, orig=orig):
                conds.setdefault(name, []).append(cond["encoder_hidden_states"])
                return orig(x_t, t, cond, *a)

            setattr(role, attr, spy)
    calls = []
    enc = models.text.encode

    def spy_encode(prompts):
        calls.append(list(prompts))
        return enc(prompts)

    models.text.encode = spy_encode
    m.step(0)
    assert conds["concept_teacher"] and conds["student"] and calls
    n_encoders = [mod for mod in [models.text] + [r.module for r in models.roles.values()]
                  if any(type(x).__name__ == "CLIPTextModel" for x in mod.modules())]
    assert n_encoders == [models.text]


def test_the_student_is_pulled_toward_the_teachers_x0_of_its_own_noised_sample(pipes, tmp_path, rt):
    """The caller's arguments: the teacher sees the student's sample noised with the step's own draws, and the
    alignment terms compare the student's pixels with the teacher's x̂0 decoded — checked by recomputing the
    loss independently."""
    cfg = _cfg(pipes, tmp_path, **{"algorithm.w_adv": 0.0})
    m, models = _method(cfg, rt)
    seen = {}
    orig_tx = m.teacher_x0

    def spy_tx(x_t, t, cond):
        out = orig_tx(x_t, t, cond)
        seen.update(x_t=x_t.clone(), t=t.clone(), x_tc=out.clone())
        return out

    m.teacher_x0 = spy_tx
    orig_sl = m.student_loss

    def spy_sl(x, fb):
        seen["x"] = x.detach().clone()
        loss, logs = orig_sl(x, fb)
        seen["loss"] = float(loss.detach())
        return loss, logs

    m.student_loss = spy_sl
    m.step(0)
    d = SampleDraws(0, 0, [0, 1], rt.device)
    t = d.randint(cfg.algorithm.t_min, cfg.algorithm.t_max + 1, "student", "align_t")
    n = d.randn(models.sample_shape, "student", "align_noise")
    torch.testing.assert_close(seen["t"], t)
    torch.testing.assert_close(seen["x_t"], models.schedule.add_noise(seen["x"], n, t))
    with torch.no_grad():
        p_s, p_tc = models.codec.decode_differentiable(seen["x"]), models.codec.decode_differentiable(seen["x_tc"])
        f = models.features
        want = (F.mse_loss(p_s, p_tc) + f.perceptual(p_s, p_tc).mean()
                + (1 - (f.identity(p_s) * f.identity(p_tc)).sum(-1)).mean())
    assert seen["loss"] == pytest.approx(float(want), rel=1e-5)
    assert float(want) > 0


def test_the_adversarial_term_labels_real_and_fake_the_right_way(pipes, tmp_path, rt):
    """With non-zero logits: the discriminator loss is softplus(-D(real)) + softplus(D(fake)) on the shots and the
    student's samples, and the student's term pushes D(fake) up (its input-gradient descends softplus(-D))."""
    cfg = _cfg(pipes, tmp_path)
    m, models = _method(cfg, rt)
    disc = models.roles["discriminator"]
    with torch.no_grad():
        for h in disc.module.heads.heads:
            h.bias.fill_(1.5)
    got = []
    orig = disc.train_discriminate

    def spy(x_t, t, cond):
        out = orig(x_t, t, cond)
        got.append(out.detach().clone())
        return out

    disc.train_discriminate = spy
    logs = m.step(0)
    real, fake = got
    want = float(F.softplus(-real).mean() + F.softplus(fake).mean())
    assert logs["discriminator/gan_d"] == pytest.approx(want, rel=1e-5)
    assert logs["student/adv"] == pytest.approx(float(F.softplus(-fake).mean()), rel=0.2)


def test_the_collaborative_phase_starts_where_configured_and_mixes_its_fraction(pipes, tmp_path, rt):
    cfg = _cfg(pipes, tmp_path, **{"train.batch_size": 8, "algorithm.collab_start": 2, "algorithm.collab_every": 3,
                                   "algorithm.collab_pool": 4, "algorithm.collab_fraction": 0.25,
                                   "algorithm.w_identity": 0.0, "algorithm.w_lpips": 0.0})
    m, models = _method(cfg, rt)
    refreshed, fractions = [], []
    orig = m.refresh_pool

    def spy(it):
        refreshed.append(it)
        orig(it)

    m.refresh_pool = spy
    for it in range(9):
        logs = m.step(it)
        fractions.append(logs.get("concept_teacher/collab_fraction"))
    assert refreshed == [2, 5, 8]
    assert fractions[:2] == [None, None]
    mixed = fractions[2:]
    assert all(f is not None for f in mixed)
    assert 0.1 <= sum(mixed) / len(mixed) <= 0.4  # 7 x 8 Bernoulli(0.25) draws (sd 0.06)
    # the mixed samples are the pool's: the teacher's real batch holds pool images where the mask says so
    d = SampleDraws(0, 8, list(range(8)), rt.device)
    batch = models.data.batch(d)
    pool = m.pool
    for role in ("concept_teacher", "discriminator"):  # the teacher's data and the student's real set
        real, _, mask = m.real_batch(batch, d, role)
        assert mask.any() and (~mask).any(), role
        assert all(any(torch.equal(r, p) for p in pool) for r in real[mask])
        assert not any(any(torch.equal(r, p) for p in pool) for r in real[~mask])
    state = json.loads(json.dumps(m.state_dict()))
    m2, _ = _method(cfg, rt)
    m2.load_state_dict(state)
    assert torch.equal(m2.pool, m.pool) and m2.pool_prompts == m.pool_prompts


def test_a_backbone_without_cross_attention_is_refused(pipes, tmp_path, rt):
    from unidad_dist.train.build import build

    cfg = _cfg(pipes, tmp_path, form="pixel")
    with pytest.raises(UserError, match="cross-attention key/value"):
        build(cfg, rt)


def test_paper_features_without_weights_name_the_files_and_the_stand_in(pipes, tmp_path, rt, monkeypatch):
    from unidad_dist.train.build import build

    for env in ("UNIDAD_CLIP", "UNIDAD_LPIPS_VGG16"):
        monkeypatch.delenv(env, raising=False)
    cfg = _cfg(pipes, tmp_path, **{"algorithm.features": "paper"})
    with pytest.raises(UserError) as e:
        build(cfg, rt)
    msg = str(e.value)
    assert "clip-vit-base-patch32" in msg and "vgg16-397923af.pth" in msg and "algorithm.features=stand_in" in msg


def _train(tmp_path, rec, *extra):
    f = tmp_path / "r.yaml"
    f.write_text(yaml.safe_dump(rec))
    return main(["train", "--config", str(f), *extra])


@pytest.mark.slow
def test_opad_resumes_bit_identically_and_exports(pipes, tmp_path):
    """4 iterations with the collaborative phase refreshing at 1 and 3 and a new token training, stopped after 2
    and resumed, equal the uninterrupted run bit for bit (every role, the pool, the token); the student exports as a
    diffusers pipeline whose tokenizer and text encoder carry the trained token, as sampling reads it."""
    over = {"train.iterations": 4, "checkpoint.every": 2, "algorithm.collab_start": 1, "algorithm.collab_every": 2,
            "algorithm.collab_pool": 2, "algorithm.collab_fraction": 0.5, "student.ema": 0.9, "run.deterministic": True,
            **TOKEN}
    full = _recipe(pipes["sd15"], pipes["shots"], tmp_path / "full", **over)
    assert _train(tmp_path, full) == 0
    part = _recipe(pipes["sd15"], pipes["shots"], tmp_path / "part", **over)
    assert _train(tmp_path, part, "train.iterations=2") == 0
    assert _train(tmp_path, part) == 0
    from unidad_dist.train.checkpoint import role_weights

    ck = "checkpoints/iter_0000004"
    for role in ("student", "concept_teacher", "discriminator"):
        a, b = role_weights(tmp_path / "full" / ck, role), role_weights(tmp_path / "part" / ck, role)
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), role
    sa = json.loads((tmp_path / "full" / ck / "method_rank0.json").read_text())
    sb = json.loads((tmp_path / "part" / ck / "method_rank0.json").read_text())
    assert sa["collab"] == sb["collab"] and sa["collab"]["iteration"] == 3
    assert sa["token"] == sb["token"] and sa["token"]["token"] == "<new1>"
    assert main(["export", "--run", str(tmp_path / "full"), "--out", str(tmp_path / "export")]) == 0
    assert (tmp_path / "export" / "unet").is_dir()
    from unidad_dist.methods.opad import _unb64
    from unidad_dist.train.loop import load_run

    trained = _unb64(sa["token"]["rows"][0])
    teacher = role_weights(tmp_path / "full" / ck, "concept_teacher")["module.tokens.weights.0"]
    assert torch.equal(trained, teacher.float())
    _, models, _, _ = load_run(tmp_path / "full")  # what sample and export read
    assert torch.equal(models.text.token_rows()[0], trained)
    tok, enc = _fresh_encoder(tmp_path / "export")
    assert enc.get_input_embeddings().weight[tok.convert_tokens_to_ids("<new1>")].equal(trained.reshape(-1))
    ids = tok(["a <new1> cat"], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(enc(ids).last_hidden_state, models.text.encode(["a <new1> cat"])["encoder_hidden_states"])
        torch.testing.assert_close(enc(ids).last_hidden_state, _hidden_with_row(pipes["sd15"], ["a <new1> cat"], trained))


@pytest.mark.slow
def test_opad_in_split_placement_on_2_ranks_equals_one_rank(pipes, tmp_path):
    """Split placement (student on rank 0; teacher and discriminator on rank 1, the exchange carrying the samples
    one way and x̂0_tc + the adversarial input-gradient the other) trains as the colocated 1-rank run does."""
    import subprocess
    import sys

    from unidad_dist.methods.opad import _unb64
    from unidad_dist.train.checkpoint import role_weights

    over = {"train.iterations": 3, "algorithm.collab_start": 1, "algorithm.collab_every": 1,
            "algorithm.collab_pool": 2, "algorithm.collab_fraction": 0.5, **TOKEN}  # the token sent to the student
    for role in ("concept_teacher", "student", "discriminator"):  # Adam with eps 1e-8 turns rounding into lr-sized steps
        over.update({f"{role}.optimizer.lr": 1e-4, f"{role}.optimizer.eps": 1e-3})
    one = _recipe(pipes["sd15"], pipes["shots"], tmp_path / "one", **over)
    assert _train(tmp_path, one) == 0
    split = _recipe(pipes["sd15"], pipes["shots"], tmp_path / "split", **{**over, "placement.mode": "split"})
    f = tmp_path / "split.yaml"
    f.write_text(yaml.safe_dump(split))
    r = subprocess.run([sys.executable, "-m", "unidad_dist", "launch", "local", "--nproc", "2", "--config", str(f)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    ck = "checkpoints/iter_0000003"
    for role in ("student", "concept_teacher", "discriminator"):
        a, b = role_weights(tmp_path / "one" / ck, role), role_weights(tmp_path / "split" / ck, role)
        assert set(a) == set(b)
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=2e-6, msg=f"{role}.{k}")
    # the student's rank reads the token the teacher's rank trained (sent after each teacher step)
    tokens = [json.loads((tmp_path / r / ck / f"method_rank{i}.json").read_text())["token"]
              for r, i in (("split", 0), ("split", 1), ("one", 0))]
    assert tokens[0] == tokens[1]
    tok0, enc0 = _fresh_encoder(pipes["sd15"])
    init = enc0.get_input_embeddings().weight.detach()[tok0("cat", add_special_tokens=False).input_ids].mean(0)
    assert not torch.equal(_unb64(tokens[0]["rows"][0]).reshape(-1), init)
    torch.testing.assert_close(_unb64(tokens[0]["rows"][0]), _unb64(tokens[2]["rows"][0]), rtol=1e-4, atol=2e-6)
    lines = [json.loads(x) for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert any("student/mse" in r_ and "concept_teacher/denoise" in r_ and "discriminator/gan_d" in r_ for r_ in lines)


@pytest.mark.slow
def test_the_shipped_recipe_runs_with_a_tiny_model(pipes, tmp_path, repo_root):
    """recipes/opad_subject.yaml with its paths swapped for a tiny SD-form pipeline (teacher and student),
    the stand-in feature networks (no CLIP/LPIPS weights here) and 2 iterations; its own settings survive."""
    recipe = repo_root / "recipes" / "opad_subject.yaml"
    rec = yaml.safe_load(recipe.read_text())
    pipe = pipes["sd15"]
    over = [f"concept_teacher.backbone={pipe}", f"student.backbone={pipe}", f"data.target.path={pipes['shots']}",
            f"run.dir={tmp_path / 'run'}", "train.iterations=2", "checkpoint.every=0", "logging.progress=false",
            "logging.sample_every=0", "logging.grid_size=2", "eval.num_samples=2", "algorithm.features=stand_in",
            "algorithm.collab_start=1", "algorithm.collab_pool=2"]
    assert main(["train", "--config", str(recipe), *over]) == 0
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["algorithm"]["name"] == "opad" and saved["algorithm"]["kv_only"] is True
    assert saved["algorithm"]["w_adv"] == rec["algorithm"]["w_adv"]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["iterations"] == 2 and "stand-in" in summary["features"]
    assert summary["collab_pool_iteration"] == 1


def test_paper_features_are_the_evaluation_networks_and_pass_gradients(tmp_path, monkeypatch):
    """algorithm.features=paper: the identity embedding is CLIP's image embedding as evaluation computes it (the
    processor's resize/crop/normalisation done in torch), the perceptual distance is evaluation's LPIPS-VGG, and
    both pass gradients to the images."""
    from eval_fixtures import seeded_images, seeded_state
    from test_eval_networks import FIXTURE, _file, _located, _tiny_clip

    from unidad_dist.core.images import to_uint8
    from unidad_dist.eval import alignment, networks, paper

    clip_dir = _tiny_clip(tmp_path / "clip")
    trunk = _file(tmp_path, "vgg.pth", seeded_state(FIXTURE["vgg16_keys"]))
    heads = _file(tmp_path, "heads.pth", seeded_state(FIXTURE["lpips_heads_keys"]))
    found = {"clip": networks.locate("clip", str(clip_dir), check=(("model_type", "clip"),)),
             "vgg16": _located("vgg16", trunk), "lpips_heads": _located("lpips_heads", heads)}
    monkeypatch.setattr(alignment, "locate", lambda name, configured=None: found[name])
    feats = alignment.build_features("paper", None, 0, torch.device("cpu"))
    x = to_uint8(seeded_images(4, 32, 1)).float() / 127.5 - 1  # 8-bit images: the processor's input exactly
    y = to_uint8(seeded_images(4, 32, 2)).float() / 127.5 - 1
    model, proc, _ = networks.load_clip(found["clip"])
    want = paper.clip_image_embeddings(model, proc, to_uint8(x))
    torch.testing.assert_close(feats.identity(x), want, atol=1e-5, rtol=1e-4)
    lp = networks.load_lpips(found["vgg16"], found["lpips_heads"])
    torch.testing.assert_close(feats.perceptual(x, y), lp(x, y))
    xg = x.clone().requires_grad_(True)
    ((1 - (feats.identity(xg) * feats.identity(y)).sum(-1)).mean() + feats.perceptual(xg, y).mean()).backward()
    assert xg.grad is not None and float(xg.grad.abs().sum()) > 0
    assert not any(p.requires_grad for p in feats.parameters())
    assert set(feats.sha256) == {"clip", "vgg16", "lpips_heads"}


@pytest.mark.parametrize("shape, size", [((2, 3, 96, 80), (40, 34)), ((1, 3, 32, 32), (56, 48))])
def test_the_clip_resize_is_bicubic_interpolation_as_matrices(shape, size):
    """PaperFeatures resizes with two matrix products (a deterministic CUDA backward) that equal PyTorch's
    antialiased bicubic interpolate, down and up."""
    from unidad_dist.eval.alignment import resize_bicubic

    x = torch.rand(shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    want = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
    torch.testing.assert_close(resize_bicubic(x, *size), want, atol=1e-4, rtol=0)


def test_a_student_backbone_of_another_text_family_and_a_t_max_beyond_the_schedule_are_refused(pipes, tmp_path, rt):
    from unidad_dist.train.build import build

    cfg = _cfg(pipes, tmp_path, **{"student.backbone": str(pipes["sdxl"])})
    with pytest.raises(UserError, match="another text conditioning.*cross_attention_dim 64 vs 32"):
        build(cfg, rt)
    with pytest.raises(UserError, match="algorithm.t_max=1000 .* timesteps 0..999"):
        _method(_cfg(pipes, tmp_path, **{"algorithm.t_max": 1000}), rt)


def test_without_the_adversarial_term_there_is_no_discriminator(pipes, tmp_path, rt):
    cfg = _cfg(pipes, tmp_path, **{"algorithm.w_adv": 0.0, "discriminator.grad_accum": 2})
    m, models = _method(cfg, rt)
    assert set(models.roles) == {"concept_teacher", "student"}
    logs = m.step(0)
    assert "student/adv" not in logs and not any(k.startswith("discriminator/") for k in logs)
    assert m.calls["student"] == 1  # one micro-batch of samples: none made for an absent discriminator


def test_the_new_token_trains_alike_in_a_zero3_teacher(pipes, tmp_path):
    """The token's rows are a module of the teacher gathered inside its forward: a ZeRO-3 teacher trains them as
    a ZeRO-0 one does (and shares them with the encoder)."""
    from unidad_dist.methods.opad import _unb64

    rows = {}
    for stage in (0, 3):
        rec = _recipe(pipes["sd15"], pipes["shots"], tmp_path / f"z{stage}",
                      **{**TOKEN, "concept_teacher.zero_stage": stage, "concept_teacher.optimizer.weight_decay": 0.0})
        assert _train(tmp_path, rec) == 0
        st = json.loads((tmp_path / f"z{stage}" / "checkpoints" / "iter_0000002" / "method_rank0.json").read_text())
        rows[stage] = _unb64(st["token"]["rows"][0])
    tok0, enc0 = _fresh_encoder(pipes["sd15"])
    init = enc0.get_input_embeddings().weight.detach()[tok0("cat", add_special_tokens=False).input_ids].mean(0)
    assert not torch.allclose(rows[0].reshape(-1), init, atol=1e-4)
    torch.testing.assert_close(rows[3], rows[0], rtol=1e-5, atol=1e-6)
