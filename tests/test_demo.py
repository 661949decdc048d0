"""`metastone-jax demo --quick`: the whole pipeline at toy sizes. Checks the artifacts exist and
agree with each other and with the pools they come from (not the accuracy: that is the full
demo's job, measured and reported in the README)."""

import json
import os
import re

import numpy as np
import pytest

from metastone_jax.demo.report import ROWS
from metastone_jax.evaluate.harness import read_pool
from metastone_jax.main import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("demo"))
    main(["metastone-jax", "demo", "--quick", f"--workdir={workdir}", "--config.progress=False"])
    return workdir


def test_quick_demo_writes_consistent_artifacts(quick_run, capsys):
    wd = quick_run
    for name in ("results.json", "table.txt", "diagnosis.txt", "aha.png", "compute.png"):
        assert os.path.getsize(os.path.join(wd, name)) > 0, name
    for name in ("aha.png", "compute.png"):
        with open(os.path.join(wd, name), "rb") as f:
            assert f.read(8) == PNG_MAGIC
    res = json.load(open(os.path.join(wd, "results.json")))
    ks = [int(k) for k in res["config"]["eval"]["ks"]]
    assert ks == [1, 2, 8, 32]
    table = {key: {int(k): v for k, v in row.items()} for key, row in res["table"].items()}
    assert set(table) == {key for key, _, _ in ROWS}

    pool = read_pool(os.path.join(wd, "eval", f"pool-{res['config']['spr']['form']}.jsonl"))
    assert len(pool) == res["questions"] == 8
    assert all(len(q["candidates"]) == res["samples"] == 32 for q in pool)
    # The ablation head scores the same candidates (sampled once, its scores from the kept step
    # features): same texts and step counts, other scores.
    ablation = read_pool(os.path.join(wd, "eval", f"pool-{res['config']['spr']['ablation_form']}"
                                      ".jsonl"))  # fmt: skip
    assert [c["text"] for q in ablation for c in q["candidates"]] == [
        c["text"] for q in pool for c in q["candidates"]
    ]
    a_scores = [c["step_scores"] for q in ablation for c in q["candidates"]]
    m_scores = [c["step_scores"] for q in pool for c in q["candidates"]]
    assert [len(s) for s in a_scores] == [len(s) for s in m_scores] and a_scores != m_scores
    # Per-sample accuracy is the share of correct candidates in the pool.
    share = np.mean([np.mean([c["correct"] for c in q["candidates"]]) for q in pool])
    assert table["random"][1]["mean"] == pytest.approx(share)
    for k in ks:
        for key, _, _ in ROWS:
            m = table[key].get(k)
            if m is None:
                continue
            lo, hi = m["ci95"]
            assert 0.0 <= lo <= m["mean"] <= hi <= 1.0, (key, k)
            # Any selection picks within the group, so it can't beat "any of them is correct".
            if key != "beam":
                assert m["mean"] <= table["oracle"][k]["mean"] + 1e-12, (key, k)
        # At k = 1 every selection is the single candidate.
    for key in ("vote", "sprm_geomean", "weighted_vote", "sprm_last", "sprm_product", "oracle"):
        assert table[key][1]["mean"] == pytest.approx(table["random"][1]["mean"])
    for k in (2, 8):  # beam_ks of the quick preset
        assert table["beam"][k]["n_groups"] == 8
    # Compute grows linearly with k for the pool methods.
    tpq = {int(k): v for k, v in res["tokens_per_question"].items()}
    assert tpq[32] == pytest.approx(32 * tpq[1])
    # The "aha" history and the table text.
    hist = json.load(open(os.path.join(wd, "spr", "filtered", "history.json")))
    assert hist[0]["step"] == 0 and hist[-1]["step"] == res["config"]["spr"]["steps"]
    text = open(os.path.join(wd, "table.txt")).read()
    assert "SPRM best-of-k (geomean)" in text and "k=32 (high)" in text
    # The diagnosis covers every pick the table's SPRM best-of-k rows make (equal groups per
    # question, so the mean over groups is the mean over questions).
    forms = res["forms"]
    spr = res["config"]["spr"]
    assert forms == {"main": spr["form"], "ablation": spr["ablation_form"]}
    assert f"SPRM best-of-k, {forms['ablation']} head (ablation)" in text
    for form, row in ((forms["main"], "sprm_geomean"), (forms["ablation"], "ablation")):
        d = res["diagnosis"][form]
        for k in ks:
            assert d["pick_accuracy"][str(k)] == pytest.approx(table[row][k]["mean"])
            assert sum(d["picks"][str(k)].values()) == pytest.approx(1.0)
    assert "invisible to step scores" in open(os.path.join(wd, "diagnosis.txt")).read()


def test_quick_demo_resumes_without_redoing_stages(quick_run, capsys):
    before = json.load(open(os.path.join(quick_run, "results.json")))
    main(["metastone-jax", "demo", "--quick", f"--workdir={quick_run}",
          "--config.progress=False"])  # fmt: skip
    out = capsys.readouterr().out
    assert "SFT policy: reusing" in out and "rollouts: reusing" in out
    assert "SPRM head (filtered): reusing" in out and "SPRM head (bce): reusing" in out
    after = json.load(open(os.path.join(quick_run, "results.json")))
    assert after["table"] == before["table"]


@pytest.mark.parametrize(
    "override, key, stage",
    [
        ("--config.sft.lr=0.002", "sft.lr", "sft"),
        ("--config.sampling.temperature=2.5", "sampling.temperature", "rollouts.npz"),
        ("--config.spr.lr=0.01", "head.lr", "bce"),
        ("--config.eval.samples=16", "eval.samples", "eval"),
    ],
)
def test_resume_under_other_settings_is_refused(quick_run, override, key, stage):
    """A finished stage is reused only under the settings it was made with: another value is an
    error naming the setting and the stage's output, and nothing in the workdir changes."""

    def snapshot():
        return {os.path.join(d, f): os.path.getmtime(os.path.join(d, f))
                for d, _, files in os.walk(quick_run) for f in files}  # fmt: skip

    before = snapshot()
    with pytest.raises(SystemExit, match=rf"{stage} was made with {re.escape(key)}="):
        main(["metastone-jax", "demo", "--quick", f"--workdir={quick_run}",
              "--config.progress=False", override])  # fmt: skip
    assert snapshot() == before


def test_ablation_head_on_another_backbone_is_refused(quick_run, tmp_path):
    """The evaluation scores every head on the main policy's candidates: a head checkpoint on
    another backbone (a stale workdir) is an error, not silently mixed."""
    from flax import nnx

    from metastone_jax.checkpoint import HF_FILES_DIR
    from metastone_jax.demo.pipeline import _same_backbone_head, load_policy
    from metastone_jax.train.policy_and_heads import save_policy

    main_ckpt = os.path.join(quick_run, "spr", "bce")
    model, _, _ = load_policy(main_ckpt)
    head = _same_backbone_head(model, os.path.join(quick_run, "spr", "filtered"))
    assert head.fc1.kernel.shape == model.sprm.fc1.kernel.shape
    other, _, _ = load_policy(main_ckpt)
    other.embed[...] = other.embed[...] + 1e-3
    out = str(tmp_path / "other")
    save_policy(other, nnx.clone(other.sprm), os.path.join(main_ckpt, HF_FILES_DIR), out, {})
    with pytest.raises(ValueError, match="its backbone differs from the main head's policy"):
        _same_backbone_head(model, out)


def test_spr_study_scores_the_demo_heads_as_the_sampler_did(quick_run, capsys):
    """`demo --spr-study`: the study scores the pool from teacher-forced features; for the demo's
    own two heads its best-of-k must equal the table's, which comes from the step scores the
    sampler computed inside the decode loop."""
    main(["metastone-jax", "demo", "--quick", f"--workdir={quick_run}", "--spr-study",
          "--config.progress=False"])  # fmt: skip
    out = capsys.readouterr().out
    assert "+ 1 pass, fresh rollouts" in out
    res = json.load(open(os.path.join(quick_run, "results.json")))
    study = json.load(open(os.path.join(quick_run, "spr_study.json")))
    cfg = res["config"]
    forms = cfg["spr"]["form"], cfg["spr"]["ablation_form"]
    rows = study["rows"]
    # Two demo heads, then per LR (quick: one) each form on fresh rollouts + filtered on its own.
    assert [r.get("head") for r in rows[:2]] == list(forms) and len(rows) == 2 + 1 * (3 + 1)
    for row, key in zip(rows[:2], ("sprm_geomean", "ablation"), strict=True):
        for k in study["ks"]:
            want = 100 * res["table"][key][str(k)]["mean"]
            assert row["best_of_k"][str(k)] == pytest.approx(want)
    assert study["ks"] == [2, 8, 32] and os.path.getsize(os.path.join(quick_run, "spr_study.txt"))
    for r in rows:
        assert 0.0 <= r["held_out_best_of_group"] <= 100.0
        assert all(0.0 <= v <= 100 * res["table"]["oracle"][k]["mean"] + 1e-9
                   for k, v in r["best_of_k"].items())  # fmt: skip
    # The fresh rollouts are other prompts (group ids after the heads' prompts) and other draws.
    own = np.load(os.path.join(quick_run, "spr", "rollouts.npz"))
    fresh = np.load(os.path.join(quick_run, "spr", "fresh-rollouts.npz"))
    n_own = cfg["spr"]["rollout_prompts"]
    assert own["group"].max() == n_own - 1 and fresh["group"].min() == n_own
    assert len(fresh["labels"]) == cfg["study"]["fresh_prompts"] * cfg["spr"]["k"]
    assert not np.array_equal(own["tokens"][: len(fresh["tokens"])], fresh["tokens"])


def test_spr_study_refuses_a_pool_it_cannot_reproduce(quick_run):
    """A candidate whose stored step scores differ from what its tokens give (another policy's
    pool, or text that does not re-encode to the sampled tokens) is named, not scored."""
    from metastone_jax.checkpoint import load_policy
    from metastone_jax.demo.spr_study import check_pool_features, pool_rows
    from metastone_jax.train.head_only import step_features

    model, tokenizer, step = load_policy(os.path.join(quick_run, "spr", "bce"))
    pool = read_pool(os.path.join(quick_run, "eval", "pool-bce.jsonl"))[:2]
    feats = step_features(model, pool_rows(pool, tokenizer), step, mode="inference")
    check_pool_features(model.sprm, feats, pool)
    j = next(j for j, c in enumerate(pool[1]["candidates"]) if c["step_scores"])
    pool[1]["candidates"][j]["step_scores"][0] += 0.01
    with pytest.raises(ValueError, match=f"pool question '{pool[1]['id']}' candidate {j}:"):
        check_pool_features(model.sprm, feats, pool)


def test_grpo_study_trains_heads_under_one_moving_policy(quick_run, capsys):
    """`demo --grpo-study`: one GRPO + SPR run per form from the demo's main head. The policy
    moves, both runs end with the same policy (the SPR gradient is kept out of the backbone) and
    different heads, every head scores the same candidates, and the SFT rows are the demo's."""
    import jax

    from metastone_jax.checkpoint import load_params_numpy

    main(["metastone-jax", "demo", "--quick", f"--workdir={quick_run}", "--grpo-study",
          "--config.progress=False"])  # fmt: skip
    assert "GRPO + SPR (filtered)" in capsys.readouterr().out
    res = json.load(open(os.path.join(quick_run, "results.json")))
    study = json.load(open(os.path.join(quick_run, "grpo_study.json")))
    assert open(os.path.join(quick_run, "grpo_study.png"), "rb").read(8) == PNG_MAGIC
    steps = res["config"]["grpo_study"]["steps"]
    _, sft, _ = load_params_numpy(os.path.join(quick_run, "spr", "bce"))
    runs = {f: load_params_numpy(os.path.join(quick_run, "grpo-study", f, "export"))[1]
            for f in ("bce", "filtered")}  # fmt: skip
    bce, filtered = ({k: v for k, v in runs[f].items() if k != "sprm"} for f in runs)
    assert jax.tree.all(jax.tree.map(np.array_equal, bce, filtered))
    assert not np.array_equal(bce["embed"], sft["embed"])  # GRPO moved the policy
    assert not np.array_equal(runs["bce"]["sprm"]["fc1"]["kernel"],
                              runs["filtered"]["sprm"]["fc1"]["kernel"])  # fmt: skip
    for f in ("bce", "filtered"):
        metrics = [json.loads(line) for line in
                   open(os.path.join(quick_run, "grpo-study", f, "metrics.jsonl"))]  # fmt: skip
        assert [m["step"] for m in metrics] == list(range(1, steps + 1))
        assert study["curves"][f][-1]["step"] == steps
    pools = {f: read_pool(os.path.join(quick_run, "grpo-study", f"pool-{f}.jsonl"))
             for f in ("bce", "filtered")}  # fmt: skip
    texts = {f: [c["text"] for q in p for c in q["candidates"]] for f, p in pools.items()}
    assert texts["bce"] == texts["filtered"]
    rows = {(r["policy"], r.get("form", r["selector"])): r["accuracy"] for r in study["rows"]}
    for key, form in (("sprm_geomean", "bce"), ("ablation", "filtered")):
        want = {str(k): 100 * res["table"][key][str(k)]["mean"] for k in study["ks"]}
        assert rows["SFT", form] == pytest.approx(want)
    for (policy, _), acc in rows.items():
        oracle = rows[policy, "oracle"]
        assert all(0.0 <= acc[k] <= oracle[k] + 1e-9 for k in acc)
    # Another setting of the study over its finished runs is refused, naming it.
    with pytest.raises(SystemExit, match=r"grpo-study was made with grpo_study\.lr="):
        main(["metastone-jax", "demo", "--quick", f"--workdir={quick_run}", "--grpo-study",
              "--config.progress=False", "--config.grpo_study.lr=0.1"])  # fmt: skip


def test_fresh_rollouts_beyond_the_sft_data_are_refused(tmp_path):
    from metastone_jax import configs
    from metastone_jax.train.policy_and_heads import collect_rollouts

    cfg = configs.load("demo.py", "quick")
    with pytest.raises(ValueError, match="sft.synthetic_size=1024"):
        collect_rollouts(cfg, None, None, None, str(tmp_path), first=1000, count=64)


def test_grpo_study_released_settings_reach_the_train_config(tmp_path):
    """`grpo_study.head_init=random`, `spr_scope=rank` and `tag` (the released head start and
    SPR normalisation): the runs start from the SFT export's untrained head, train with the
    released scope, and write beside the default study, not over it."""
    from metastone_jax.cli_common import load_config
    from metastone_jax.demo import grpo_study
    from metastone_jax.train.validate import validate_train_config

    overrides = [
        "--config.grpo_study.head_init=random",
        "--config.grpo_study.spr_scope=rank",
        "--config.grpo_study.spr_ranks=4",
        "--config.grpo_study.grad_accum=2",
        "--config.grpo_study.head_lr=1e-5",
        "--config.grpo_study.tag=released",
    ]
    cfg = load_config("t", "quick", overrides, ("demo.py",))
    run = {"policy": "SFT", "heads": {cfg.spr.form: {"ckpt": "HEAD"}}}
    assert grpo_study.initial_head(cfg, run) == "SFT"
    config = grpo_study.grpo_config(cfg, "filtered", "SFT")
    assert (config.spr.scope, config.spr.ranks, config.data.grad_accum) == ("rank", 4, 2)
    assert config.optim.sprm_lr == 1e-5 and config.init_ckpt == "SFT"
    validate_train_config(config)  # quick: 4 prompts x 4 rollouts / 2 micro-batches / 4 ranks
    paths = grpo_study.study_paths(cfg, str(tmp_path))
    assert paths == (str(tmp_path / "grpo-study-released"), str(tmp_path / "grpo_study-released"))
    cfg.grpo_study.head_init = "main"
    assert grpo_study.initial_head(cfg, run) == "HEAD"
    cfg.grpo_study.head_init = "warm"
    with pytest.raises(ValueError, match=r"grpo_study.head_init='warm'; expected one of"):
        grpo_study.initial_head(cfg, run)
    cfg.grpo_study.tag = "../x"
    with pytest.raises(ValueError, match=r"grpo_study.tag='../x'"):
        grpo_study.study_paths(cfg, str(tmp_path))
