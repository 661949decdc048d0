"""Scaling sweeps: compute accounting, the log-law fit, grid and launch commands, per-point
metrics by hand, and `run_sweep` end to end with a fake trainer (tiny random models)."""

import importlib.util
import json
import math
import os
import shutil

import numpy as np
import pytest

from metastone_jax.scaling import law, sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU_CONFIG = os.path.join(ROOT, "configs", "sweeps", "cpu.py")
TEMPLATE = (
    "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}Answer: {% endif %}"
)


def cpu_config(**changes):
    spec = importlib.util.spec_from_file_location("sweep_cpu_cfg", CPU_CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for key, value in changes.items():
        config[key] = value
    return config


# --- law.py -------------------------------------------------------------------------------


def test_compute_accounting_by_hand():
    assert law.sprm_head_flops(4) == 2 * (4 * 8) + 2 * (8 * 1) == 80
    # k = 3 candidates of 10, 20, 30 tokens with 1, 0, 2 scored steps, N = 1000, D = 4:
    # 2 * 1000 * 60 + 80 * 3 = 120240
    assert law.question_compute(1000, 4, [10, 20, 30], [1, 0, 2]) == 120_240.0
    assert law.question_compute(1000, 4, 60, 3) == 120_240.0
    with pytest.raises(ValueError, match=">= 0"):
        law.question_compute(1000, 4, [-1], [0])


def test_fit_log_law_exact_and_noisy():
    c = [1e3, 1e4, 1e5, 1e6]
    fit = law.fit_log_law(c, [0.05 * math.log10(x) + 0.1 for x in c])
    assert fit.a == pytest.approx(0.05) and fit.b == pytest.approx(0.1)
    assert fit.r2 == pytest.approx(1.0) and fit.n == 4
    # x = log10 C = 1, 2, 3; y = 1, 3, 2: a = 0.5, b = 1, predictions 1.5, 2, 2.5,
    # SS_res = 0.25 + 1 + 0.25 = 1.5, SS_tot = 1 + 1 + 0 = 2, R^2 = 0.25.
    fit = law.fit_log_law([10, 100, 1000], [1, 3, 2])
    assert (fit.a, fit.b, fit.r2) == pytest.approx((0.5, 1.0, 0.25))
    assert (fit.a, fit.b) == pytest.approx(tuple(np.polyfit([1, 2, 3], [1, 3, 2], 1)))
    flat = law.fit_log_law([10, 100], [0.3, 0.3])  # SS_tot = 0 and the fit is exact
    assert flat.a == pytest.approx(0.0) and flat.r2 == 1.0
    assert "R² = 0.250" in law.fit_log_law([10, 100, 1000], [1, 3, 2]).equation()


@pytest.mark.parametrize(
    "compute, acc, message",
    [
        ([10, 10, 10], [0.1, 0.2, 0.3], "at least 2 distinct compute values, got 1"),
        ([10], [0.1], "at least 2 distinct"),
        ([0, 10], [0.1, 0.2], "must be > 0"),
        ([10, 100], [0.1], "2 compute values but 1 accuracies"),
        ([10, 100], [0.1, float("nan")], "finite"),
    ],
)
def test_fit_log_law_errors(compute, acc, message):
    with pytest.raises(ValueError, match=message):
        law.fit_log_law(compute, acc)


# --- grid, commands, metrics ----------------------------------------------------------------


def test_grid_and_point_ids():
    points = sweep.expand_grid(cpu_config(think_budgets=(None, 12)))
    assert len(points) == 3 * 6 * 2
    assert points[0].point_id == "size=demo_s/k=1/budget=none"
    assert points[1].point_id == "size=demo_s/k=1/budget=12"
    assert points[-1].point_id == "size=demo/k=32/budget=12"
    assert {(p.k, p.groups, p.candidates) for p in points} == {
        (1, 32, 32), (2, 16, 32), (4, 8, 32), (8, 4, 32), (16, 2, 32), (32, 1, 32)
    }  # fmt: skip
    three = sweep.expand_grid(cpu_config(ks=(3,)))[0]
    assert (three.groups, three.candidates) == (10, 30)
    with pytest.raises(ValueError, match=r"config.ks: expected ints in \[1, candidates"):
        sweep.expand_grid(cpu_config(ks=(64,)))
    with pytest.raises(ValueError, match="think_budgets"):
        sweep.expand_grid(cpu_config(think_budgets=(-1,)))


def test_print_commands_golden(capsys, tmp_path):
    from metastone_jax.main import main

    main(["metastone-jax", "sweep", "--config=configs/sweeps/cpu.py", "--workdir=/mnt/sweep",
          "--print_commands", "--config.ks=(1,8)", "--config.think_budgets=(None,)",
          "--config.sizes.demo.n_layers=8"])  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6
    assert lines[0] == (
        "gcloud compute tpus tpu-vm ssh metastone-sweep --zone=us-central2-b --worker=all "
        '--command="cd ~/metastone-jax && metastone-jax sweep --config=configs/sweeps/cpu.py '
        "--workdir=/mnt/sweep --only=size=demo_s/k=1/budget=none '--config.ks=(1,8)' "
        "'--config.think_budgets=(None,)' --config.sizes.demo.n_layers=8\""
    )
    assert [line.split("--only=")[1].split()[0] for line in lines] == [
        f"size={s}/k={k}/budget=none" for s in ("demo_s", "demo_m", "demo") for k in (1, 8)
    ]
    assert not os.path.exists("/mnt/sweep/points.jsonl")


def test_cli_errors(tmp_path):
    from metastone_jax.main import main

    with pytest.raises(SystemExit, match="--workdir=DIR is required"):
        main(["metastone-jax", "sweep", "--config=configs/sweeps/cpu.py"])
    with pytest.raises(SystemExit, match=r"has no key 'kk'; valid keys: \[.*'ks'"):
        main(["metastone-jax", "sweep", f"--workdir={tmp_path}", "--config.kk=(1,)"])
    with pytest.raises(SystemExit, match="unknown argument '--bogus'"):
        main(["metastone-jax", "sweep", f"--workdir={tmp_path}", "--bogus"])
    with pytest.raises(SystemExit, match="--only=size=x: not a point of this grid"):
        main(["metastone-jax", "sweep", f"--workdir={tmp_path}", "--only=size=x"])


def test_point_metrics_by_hand():
    # 1 question, k = 2, M = 4: groups (c0, c1) and (c2, c3).
    s = sweep.Samples(
        correct=np.array([[False, True, True, False]]),
        score=np.array([[0.2, 0.9, 0.5, 0.5]]),  # group 2 ties: the first (correct) wins
        tokens=np.array([[10, 20, 30, 40]]),
        steps=np.array([[1, 2, 3, 4]]),
        seconds_per_question=8.0,
    )
    point = sweep.Point("m", k=2, budget=None, candidates=4)
    r = sweep.point_metrics(s, point, n_params=100, d_model=4)
    assert r["accuracy"] == 1.0  # picks c1 and c2
    assert r["random_accuracy"] == 0.5 and r["pass_at_k"] == 1.0
    assert r["candidate_accuracy"] == 0.5
    # groups: 2*100*30 + 80*3 = 6240 and 2*100*70 + 80*7 = 14560 -> mean 10400
    assert r["compute"] == 10_400.0 and r["tokens"] == 50.0 and r["steps"] == 5.0
    assert r["wall_s"] == 4.0  # 8 s for 4 candidates -> 4 s for one group of 2


def test_read_points_repairs_the_tail(tmp_path, capsys):
    path = str(tmp_path / "points.jsonl")
    a, b = json.dumps({"point_id": "a", "v": 1}), json.dumps({"point_id": "b", "v": 2})
    open(path, "w").write(a + "\n" + b)  # complete record, newline missing
    assert sorted(sweep.read_points(path)) == ["a", "b"]
    assert open(path).read() == a + "\n" + b + "\n"
    open(path, "w").write(a + "\n" + b[:9])  # cut off mid-record
    assert list(sweep.read_points(path)) == ["a"]
    assert open(path).read() == a + "\n"
    assert "dropping a truncated last line" in capsys.readouterr().out
    open(path, "w").write("{oops\n" + a + "\n")
    with pytest.raises(ValueError, match="points.jsonl:1: not a point record"):
        sweep.read_points(path)


# --- run_sweep end to end ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from metastone_jax.data.spm_train import train_sentencepiece
    from metastone_jax.data.synthetic import make_examples

    out = tmp_path_factory.mktemp("sweep-tok") / "tok"
    texts = [r["prompt"] + "\n" + r["solution"] for r in make_examples("train", 300, 0)]
    train_sentencepiece(texts, str(out), vocab_size=384, chat_template=TEMPLATE)
    return str(out)


class FakeTrainer:
    """A tiny random policy + SPRM head checkpoint per size (fast), counting its calls."""

    def __init__(self, tokenizer_dir):
        self.tokenizer_dir, self.calls, self.sampling = tokenizer_dir, [], []

    def __call__(self, size, overrides, workdir, *, sampling):
        self.sampling.append(sampling)
        from flax import nnx

        from metastone_jax.checkpoint import HF_FILES_DIR, atomic_dir, write_params_checkpoint
        from metastone_jax.data.tokenizer import load_tokenizer
        from metastone_jax.model import create_model
        from metastone_jax.presets import get_preset

        self.calls.append(size)
        out = os.path.join(workdir, "ckpt")
        if os.path.isdir(out):
            return out
        vocab = load_tokenizer(self.tokenizer_dir).vocab_size
        cfg = get_preset("tiny").replace(vocab_size=vocab, **overrides)
        with atomic_dir(out) as tmp:
            write_params_checkpoint(tmp, nnx.state(create_model(cfg, seed=1)), cfg)
            shutil.copytree(self.tokenizer_dir, os.path.join(tmp, HF_FILES_DIR))
        return out


def test_run_sweep_end_to_end_resumes_and_drops_a_truncated_line(
    tokenizer_dir, tmp_path, monkeypatch
):
    from metastone_jax.sample import engine

    sizes = {"xs": {"d_model": 32, "n_layers": 1, "d_ff": 64}, "s": {"d_model": 64}}
    sampling = {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 8}
    config = cpu_config(sizes=sizes, ks=(1, 2), think_budgets=(None,), questions=3,
                        candidates_per_point=4, chunk_questions=2, sampling=sampling)  # fmt: skip
    generate_calls = []
    real_generate = engine.generate

    def counting_generate(*args, **kwargs):
        generate_calls.append(kwargs["k"])
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(engine, "generate", counting_generate)
    trainer = FakeTrainer(tokenizer_dir)
    workdir = str(tmp_path / "sweep")
    result = sweep.run_sweep(config, workdir, trainer=trainer, progress=False)

    assert trainer.calls == ["xs", "s"]
    # k = 1 and 2 share the 4 samples per question: per size, the first chunk (2 questions,
    # warming the engine up) and the timed rest (1 question)
    assert generate_calls == [4, 4] * 2
    ids = [r["point_id"] for r in result.points]
    assert ids == ["size=xs/k=1/budget=none", "size=xs/k=2/budget=none",
                   "size=s/k=1/budget=none", "size=s/k=2/budget=none"]  # fmt: skip
    for name in ("points.jsonl", "table.md", "scaling.png", "fit.json"):
        assert os.path.getsize(os.path.join(workdir, name)) > 0, name
    r = result.points[1]
    assert (r["k"], r["groups"], r["questions"], r["candidates"]) == (2, 2, 3, 4)
    assert 0 < r["tokens"] <= 2 * 8 and r["wall_s"] > 0 and 0 <= r["accuracy"] <= 1
    xs, s = result.points[0], result.points[2]
    assert xs["n_params"] < s["n_params"]
    # k = 2 spends twice the tokens of k = 1 on the same samples
    assert result.points[1]["tokens"] == pytest.approx(2 * result.points[0]["tokens"])
    fit = json.load(open(os.path.join(workdir, "fit.json")))
    assert fit["n"] == 4 and set(fit) >= {"a", "b", "r2", "per_size"}
    assert "| size=xs/k=1/budget=none |" in open(os.path.join(workdir, "table.md")).read()

    # A re-run skips every finished point: no training, no sampling; the report is rewritten.
    os.remove(os.path.join(workdir, "table.md"))
    again = sweep.run_sweep(config, workdir, trainer=trainer, progress=False)
    assert trainer.calls == ["xs", "s"] and generate_calls == [4, 4] * 2
    assert again.points == result.points
    assert os.path.exists(os.path.join(workdir, "table.md"))

    # An append cut off mid-line is dropped; --only runs that point alone; then the rest.
    path = os.path.join(workdir, "points.jsonl")
    lines = open(path).read().splitlines()
    with open(path, "w") as f:
        f.write("\n".join(lines[:2]) + "\n" + lines[3][:40])  # s/k=1 gone, s/k=2 cut off
    only = sweep.run_sweep(config, workdir, trainer=trainer, progress=False,
                           only="size=s/k=2/budget=none")  # fmt: skip
    assert trainer.calls == ["xs", "s", "s"] and generate_calls == [4, 4] * 3
    assert [r["point_id"] for r in only.points] == ids[:2] + ids[3:]
    assert len(open(path).read().splitlines()) == 3
    rest = sweep.run_sweep(config, workdir, trainer=trainer, progress=False)
    assert trainer.calls == ["xs", "s", "s", "s"] and generate_calls == [4, 4] * 4
    assert [r["point_id"] for r in rest.points] == ids
    for a, b in zip(rest.points, result.points, strict=True):  # same seeds, same samples
        assert (a["accuracy"], a["tokens"]) == (b["accuracy"], b["tokens"])

    # Other settings for a finished point are refused.
    changed = config.copy_and_resolve_references()
    changed.seed = 1
    with pytest.raises(ValueError, match="was run with other settings"):
        sweep.run_sweep(changed, workdir, trainer=trainer, progress=False)
