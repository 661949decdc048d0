"""The README's journeys run as written, on a tiny checkpoint.

Each `### N. ...` section under "## Journeys" in README.md has a bash block. Its lines
(backslash continuations joined) run in README order in one temporary directory:

- `metastone-jax ...` runs in-process (`metastone_jax.main.main`), with only the flags of SHRINK
  appended (test-sized work);
- `hf download REPO --local-dir DIR` (no network here) becomes DIR = a copy of
  ../shared/fixtures/tiny-llama-bf16, a real HF checkpoint, plus the tokenizer.json it lacks;
  `hf upload` is skipped; `export` sets the variables later lines use;
- `python launch/tpu.py ...` runs with --dry_run (prints its gcloud commands, runs none), and the
  `metastone-jax train` after its `--` is only parsed: flags, config, validation and workdir
  checks run, `train()` itself is replaced by a recorder.

The sweep's `--config=cpu` line runs with the sweep's trainer (three demo-size SFT runs, ~30
min) replaced by the CPU journey's SFT export; everything after it (sampling, metrics, fit,
table) runs. EXPECTED pins how many `metastone-jax` commands each journey runs and parses, so a
removed, renamed or broken journey command fails here.
"""

import importlib
import json
import os
import re
import shlex
import shutil
import sys

import pytest
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from metastone_jax.main import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from launch import tpu  # noqa: E402

README = os.path.join(ROOT, "README.md")

# README journey heading -> (metastone-jax commands run, metastone-jax commands only parsed).
EXPECTED = {
    "1. Get a checkpoint and convert it": (1, 0),
    "2. Sample: best-of-k and beam search": (2, 0),
    "3. Evaluate on AIME": (1, 0),
    "4. Train on CPU: SFT, then GRPO + SPR": (2, 0),
    "5. Train on Cloud TPU": (1, 1),  # plan runs; the train command on the TPU is parsed
    "6. Scaling sweep": (2, 0),
    "7. Export back to Hugging Face": (1, 0),
}

# The only flags appended to the README's commands (by command): each shrinks the work to test
# size (or silences a progress bar); nothing else about a command changes.
SHRINK = {
    "convert": [],
    "sample": ["--max_new_tokens=8"],  # README: 1024 new tokens per candidate (the default)
    "evaluate": ["--limit=1", "--max_new_tokens=8", "--no_progress"],  # 1 question of 30, 8 tokens
    "train": [
        "--config.train.steps=2",  # tiny-sft / tiny-grpo: 20 steps
        "--config.train.save_every=2",
        "--config.train.progress=False",
    ],
    "plan": [],
    "sweep": [  # 36 points x 100 questions x 32 candidates -> 2 ks x 2 questions x 2 candidates
        "--config.questions=2",
        "--config.ks=(1,2)",
        "--config.think_budgets=(None,)",
        "--config.candidates_per_point=2",
        "--config.chunk_questions=1",
        "--config.sampling.max_new_tokens=16",
        "--no_progress",
    ],
}

# The fixture's character-level vocabulary (../shared/fixtures/README.md): 0 sep, 1 eos, 2 pad,
# 3 unk, 4-13 the digits, 14 ',', 15 ':'. Its tokenizer is a custom class; the tokenizer.json
# written here has the same ids, drops every other character, and gives id 3 (unk, which the
# model never needs) the step text ".\n\n", so that the step token resolves as for a real model.
VOCAB = {"<sep>": 0, "</s>": 1, "<pad>": 2, ".\n\n": 3, ",": 14, ":": 15}
VOCAB.update({str(d): 4 + d for d in range(10)})


def write_fixture_tokenizer(directory: str) -> None:
    tok = Tokenizer(models.WordLevel(VOCAB))  # the normalizer leaves no unknown character
    tok.normalizer = normalizers.Replace(Regex(r"[^0-9,:]"), "")
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(["<sep>", "</s>", "<pad>"])
    tok.add_tokens([AddedToken(".\n\n", normalized=False)])
    assert tok.get_vocab_size() == 16 and tok.encode(".\n\n").ids == [3]
    tok.save(os.path.join(directory, "tokenizer.json"))


def journeys() -> dict[str, list[str]]:
    """Heading -> the command lines of its bash blocks (continuations joined)."""
    text = open(README).read()
    section = text.split("\n## Journeys\n", 1)[1].split("\n## ", 1)[0]
    out = {}
    for part in section.split("\n### ")[1:]:
        heading, body = part.split("\n", 1)
        lines = []
        for block in re.findall(r"```bash\n(.*?)```", body, re.S):
            lines += [ln.strip() for ln in block.replace("\\\n", " ").splitlines() if ln.strip()]
        out[heading.strip()] = lines
    return out


def test_readme_is_a_short_guide():
    assert len(open(README).read().splitlines()) <= 200
    assert list(journeys()) == list(EXPECTED)


def test_readme_journeys(shared_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    fixture = os.path.join(shared_dir, "fixtures", "tiny-llama-bf16")
    shutil.copy(os.path.join(shared_dir, "data", "aime24.jsonl"), "aime24.jsonl")
    # The sweep trains three demo sizes (~30 min); here each size is the CPU journey's export.
    sweep = importlib.import_module("metastone_jax.scaling.sweep")
    monkeypatch.setattr(sweep, "train_for_sweep", lambda *a, **k: str(tmp_path / "runs/sft/export"))
    trained = []  # the configs `metastone-jax train` would have trained, when only parsed
    train_cli = importlib.import_module("metastone_jax.train.cli")

    def run(args: list[str], parse_only: bool = False) -> None:
        with monkeypatch.context() as m:
            if parse_only:
                m.setattr(
                    train_cli,
                    "train",
                    lambda config, workdir: trained.append((config, workdir)) or {},
                )
            main(["metastone-jax", *args[1:], *SHRINK[args[1]]])

    counts = {}
    for heading, lines in journeys().items():
        ran = parsed = 0
        for line in lines:
            args = [os.path.expandvars(a) for a in shlex.split(line, comments=True)]
            if args[0] == "metastone-jax":
                run(args)
                ran += 1
            elif args[:2] == ["hf", "download"]:
                local = args[args.index("--local-dir") + 1]
                os.makedirs(local)
                for name in os.listdir(fixture):  # files only: the fixture is read-only
                    shutil.copyfile(os.path.join(fixture, name), os.path.join(local, name))
                write_fixture_tokenizer(local)
            elif args[:2] == ["hf", "upload"]:
                pass  # network
            elif args[0] == "export":
                for pair in args[1:]:
                    monkeypatch.setenv(*pair.split("=", 1))
            elif args[:2] == ["python", "launch/tpu.py"]:
                tpu.main([args[2], "--dry_run", *args[3:]])
                if "--" in args and args[args.index("--") + 1] == "metastone-jax":
                    run(args[args.index("--") + 1 :], parse_only=True)
                    parsed += 1
            else:
                pytest.fail(f"README, {heading}: no rule for {line!r}")
        counts[heading] = (ran, parsed)
    assert counts == EXPECTED
    out = capsys.readouterr().out

    assert os.path.isfile("ckpt/s1-1.5b/model_config.json")
    assert out.count("=== prompt 0: selected candidate") == 2
    metrics = json.load(open("eval/s1-1.5b/aime24/metrics.json"))
    assert set(metrics["modes"]) == {"low", "medium", "high"}
    for run_dir in ("runs/sft", "runs/grpo"):
        assert os.path.isfile(f"{run_dir}/export/model_config.json")
    ((config, workdir),) = trained
    assert config.preset == "grpo-1.5b-v5e-8" and config.train.tpu == "v5e-8"
    assert workdir == "gs://my-metastone-bucket/grpo-1.5b"
    assert "gcloud compute tpus tpu-vm create metastone-v5e-8" in out
    assert os.path.isfile("runs/sweep/table.md") and "--only=" in out
    assert os.path.isfile("my-model-hf/config.json")
    assert os.path.isfile("my-model-hf/score_module.pt")
