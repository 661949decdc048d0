"""metastone_jax.files: atomic writes on local and (fake) gs:// paths, staged directories, append
logs; the writers that use them on a gs:// workdir; the fake gs:// itself (tests/fake_gcs.py)."""

import json
import os

import fsspec
import numpy as np
import pytest
from etils import epath
from fake_gcs import fake_gcs_at
from test_metrics import read_events

from metastone_jax import files
from metastone_jax.checkpoint import CONFIG_FILE, atomic_dir
from metastone_jax.evaluate.harness import read_pool
from metastone_jax.train import stamps
from metastone_jax.train.metrics import MetricsWriter, read_metrics
from metastone_jax.train.rollout import SavedRollouts, save_rollouts


def tree(root) -> dict[str, bytes]:
    """{relative path: bytes} of every file under a local directory."""
    out = {}
    for top, _, names in os.walk(root):
        for n in names:
            p = os.path.join(top, n)
            out[os.path.relpath(p, root)] = open(p, "rb").read()
    return out


def fill(d, files_: dict[str, str]) -> None:
    for name, text in files_.items():
        os.makedirs(os.path.dirname(os.path.join(d, name)), exist_ok=True)
        with open(os.path.join(d, name), "w") as f:
            f.write(text)


class Boom(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# Local: atomicity


def test_write_replaces_and_creates_parents(tmp_path):
    p = tmp_path / "a" / "b" / "x.json"
    files.write_json(p, {"v": 1}, indent=1)
    files.write_json(str(p), {"v": 2})
    assert json.loads(p.read_text()) == {"v": 2} and p.read_text().endswith("\n")
    files.write_bytes(tmp_path / "y.bin", b"\x00\x01")
    assert (tmp_path / "y.bin").read_bytes() == b"\x00\x01"
    assert sorted(os.listdir(p.parent)) == ["x.json"]  # no temporary left behind
    assert oct(os.stat(p).st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


def test_failure_mid_write_keeps_the_old_file(tmp_path, monkeypatch):
    p = tmp_path / "x.txt"
    files.write_text(p, "old")

    def crash(path):  # the bytes are written, the rename has not happened
        raise Boom

    monkeypatch.setattr(files, "_fsync", crash)
    with pytest.raises(Boom):
        files.write_text(p, "new")
    with pytest.raises(Boom):
        files.write_text(tmp_path / "fresh.txt", "new")
    assert p.read_text() == "old"
    assert os.listdir(tmp_path) == ["x.txt"]  # no target made, no temporary left


def test_staged_file_keeps_the_suffix_and_publishes_only_on_success(tmp_path):
    p = tmp_path / "d" / "rows.npz"
    with files.staged_file(p) as tmp:
        assert tmp.endswith(".npz") and os.path.dirname(tmp) == str(p.parent)
        np.savez(tmp, a=np.arange(3))  # np.savez appends .npz to other names
    assert np.load(p)["a"].tolist() == [0, 1, 2]
    with pytest.raises(Boom), files.staged_file(p) as tmp:
        np.savez(tmp, a=np.arange(5))
        raise Boom
    assert np.load(p)["a"].tolist() == [0, 1, 2]
    assert os.listdir(p.parent) == ["rows.npz"]


def test_staged_dir_local_replaces_whole_or_not_at_all(tmp_path):
    out = tmp_path / "tok"
    with files.staged_dir(out) as tmp:
        assert os.path.dirname(tmp) == str(tmp_path)  # a sibling: the rename is atomic
        fill(tmp, {"a.txt": "1", "sub/b.txt": "2"})
        assert not out.exists()
    assert tree(out) == {"a.txt": b"1", "sub/b.txt": b"2"}
    with pytest.raises(Boom), files.staged_dir(out) as tmp:
        fill(tmp, {"c.txt": "3"})
        raise Boom
    assert tree(out) == {"a.txt": b"1", "sub/b.txt": b"2"}
    with files.staged_dir(out) as tmp:
        fill(tmp, {"c.txt": "3"})
    assert tree(out) == {"c.txt": b"3"}  # replaced, not merged
    assert os.listdir(tmp_path) == ["tok"]


def test_append_log_local(tmp_path):
    p = tmp_path / "sub" / "log.jsonl"
    log = files.AppendLog(p, fsync=True)
    assert not p.parent.exists()  # nothing before the first line
    log.append('{"a": 1}\n')
    assert p.read_text() == '{"a": 1}\n'  # flushed at once
    log.append('{"a": 2}\n{"a": 3}\n')
    log.close()
    with files.AppendLog(p) as log:  # a resumed run appends
        log.append('{"a": 4}\n')
    assert [json.loads(ln)["a"] for ln in p.read_text().splitlines()] == [1, 2, 3, 4]


# ---------------------------------------------------------------------------------------------
# Remote (fake gs://)


def test_fake_gcs_maps_into_tmp_path_and_is_undone(tmp_path, monkeypatch):
    with fake_gcs_at(tmp_path, monkeypatch):
        files.write_text("gs://bucket/run/a.txt", "hi")
        assert (tmp_path / "bucket" / "run" / "a.txt").read_text() == "hi"
        assert epath.Path("gs://bucket/run/a.txt").read_text() == "hi"
        assert [os.fspath(p) for p in epath.Path("gs://bucket/run").glob("*.txt")] == [
            "gs://bucket/run/a.txt"
        ]
    with pytest.raises((ImportError, ValueError)):  # gcsfs is not installed
        fsspec.get_filesystem_class("gs")


def test_remote_writes(fake_gcs):
    assert files.is_remote("gs://b/x") and files.is_remote(epath.Path("gs://b/x"))
    assert not files.is_remote(fake_gcs / "x") and not files.is_remote("rel/x")
    files.write_json("gs://bucket/run/m.json", {"v": 1})
    files.write_bytes(epath.Path("gs://bucket/run/deep/b.bin"), b"\x01")
    with files.staged_file("gs://bucket/run/rows.npz") as tmp:
        assert not files.is_remote(tmp) and tmp.endswith(".npz")
        np.savez(tmp, a=np.arange(2))
    with pytest.raises(Boom), files.staged_file("gs://bucket/run/never.npz") as tmp:
        np.savez(tmp, a=np.arange(2))
        raise Boom
    assert tree(fake_gcs / "bucket")["run/m.json"] == b'{"v": 1}\n'
    assert sorted(tree(fake_gcs / "bucket")) == ["run/deep/b.bin", "run/m.json", "run/rows.npz"]


def test_staged_dir_remote_gives_the_local_tree(fake_gcs, monkeypatch):
    old = {"a.txt": "old", "stale/s.txt": "s", "MARK": "old"}
    new = {"a.txt": "1", "sub/b.txt": "2", "MARK": "done"}
    for target in (fake_gcs / "local", "gs://bucket/out"):
        with files.staged_dir(target) as tmp:
            fill(tmp, old)
        with pytest.raises(Boom), files.staged_dir(target) as tmp:
            fill(tmp, new)
            raise Boom
    assert tree(fake_gcs / "local") == tree(fake_gcs / "bucket" / "out")

    uploads = []
    upload = files._upload
    monkeypatch.setattr(
        files, "_upload", lambda src, dst: (uploads.append(os.fspath(dst)), upload(src, dst))
    )
    for target in (fake_gcs / "local", "gs://bucket/out"):
        with files.staged_dir(target, last=("MARK",)) as tmp:
            fill(tmp, new)
    assert tree(fake_gcs / "local") == tree(fake_gcs / "bucket" / "out")
    assert tree(fake_gcs / "local") == {k: v.encode() for k, v in new.items()}
    assert uploads[-1] == "gs://bucket/out/MARK"  # the mark of a whole tree comes last
    assert sorted(uploads) == sorted(f"gs://bucket/out/{n}" for n in new)


def test_atomic_dir_to_gcs(fake_gcs):
    with atomic_dir("gs://bucket/ckpt") as tmp:
        fill(tmp, {CONFIG_FILE: "{}", "params/x": "p"})
    assert tree(fake_gcs / "bucket" / "ckpt") == {CONFIG_FILE: b"{}", "params/x": b"p"}
    with pytest.raises(ValueError, match="already exists"), atomic_dir("gs://bucket/ckpt"):
        pass


def test_append_log_remote(fake_gcs):
    obj = fake_gcs / "bucket" / "run" / "log.jsonl"
    files.write_text("gs://bucket/run/log.jsonl", "0\n")  # from an earlier run
    log = files.AppendLog("gs://bucket/run/log.jsonl", flush_secs=3600)
    log.append("1\n")
    log.append("2\n")
    assert obj.read_text() == "0\n"  # kept until a flush: an object cannot be appended to
    log.flush()
    assert obj.read_text() == "0\n1\n2\n"
    log.append("3\n")
    log.close()
    assert obj.read_text() == "0\n1\n2\n3\n"
    with files.AppendLog("gs://bucket/run/log2.jsonl", flush_secs=0) as log:
        log.append("a\n")
        assert (obj.parent / "log2.jsonl").read_text() == "a\n"  # flush_secs=0: every append
    files.AppendLog("gs://bucket/run/none.jsonl").close()
    assert not (obj.parent / "none.jsonl").exists()


def test_orbax_checkpoint_on_fake_gcs(fake_gcs):
    import orbax.checkpoint as ocp

    tree_ = {"a": np.arange(6.0).reshape(2, 3), "b": {"c": np.ones(4, np.float32)}}
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(epath.Path("gs://bucket/run/ckpt"), tree_)
        ckptr.wait_until_finished()
        back = ckptr.restore(epath.Path("gs://bucket/run/ckpt"))
    np.testing.assert_array_equal(back["a"], tree_["a"])
    np.testing.assert_array_equal(back["b"]["c"], tree_["b"]["c"])
    saved = tree(fake_gcs / "bucket" / "run" / "ckpt")
    assert "commit_success.txt" in saved  # orbax took its gs:// path (no rename)
    assert any(n.startswith("ocdbt.process_0/") for n in saved)  # tensorstore's files too

    # The manager: steps listed, old ones deleted, through the same fake.
    mgr = ocp.CheckpointManager(
        "gs://bucket/run/steps", options=ocp.CheckpointManagerOptions(max_to_keep=1)
    )
    for step in range(3):
        mgr.save(step, args=ocp.args.StandardSave(tree_))
    mgr.wait_until_finished()
    assert mgr.all_steps() == [2]
    assert sorted(os.listdir(fake_gcs / "bucket" / "run" / "steps")) == ["2"]
    mgr.close()


# ---------------------------------------------------------------------------------------------
# The writers on a gs:// workdir


def test_metrics_writer_on_gcs(fake_gcs):
    wd = "gs://bucket/run"
    local = fake_gcs / "bucket" / "run"
    with MetricsWriter(wd, enabled=True, progress=False, flush_secs=3600) as w:
        w.write(1, {"loss": 0.5})
        w.write(2, {"loss": 0.25})
        w.flush()
        assert [r["step"] for r in read_metrics(f"{wd}/metrics.jsonl")] == [1, 2]
        w.write(3, {"loss": 0.125})
    assert [r["step"] for r in read_metrics(local / "metrics.jsonl")] == [1, 2, 3]
    events = read_events(local / "tensorboard")
    assert [(s, v) for t, s, v in events if t == "loss"] == [(1, 0.5), (2, 0.25), (3, 0.125)]
    # resumed at step 2: the later records dropped, the new ones appended
    with MetricsWriter(wd, enabled=True, progress=False, start_step=2) as w:
        w.write(2, {"loss": 2.0})
    assert read_metrics(local / "metrics.jsonl") == [{"step": 1, "loss": 0.5},
                                                     {"step": 2, "loss": 2.0}]  # fmt: skip
    assert len(os.listdir(local / "tensorboard")) == 2  # one event file per run


def test_pool_stamps_and_rollouts_on_gcs(fake_gcs):
    local = fake_gcs / "bucket" / "eval"
    entries = [{"id": f"q{i}", "candidates": []} for i in range(2)]
    text = "".join(json.dumps(e) + "\n" for e in entries) + '{"id": "q2", "cand'
    files.write_text("gs://bucket/eval/pool.jsonl", text)
    assert read_pool("gs://bucket/eval/pool.jsonl", repair=True) == entries
    assert (local / "pool.jsonl").read_text() == text[: text.rindex("\n") + 1]

    stamps.claim("gs://bucket/eval/sft", {"a": 1}, output_exists=False)
    assert stamps.stamp_path("gs://bucket/eval/sft/") == "gs://bucket/eval/sft.stage.json"
    assert json.loads((local / "sft.stage.json").read_text()) == {"a": 1}
    with pytest.raises(ValueError, match="a=1"):
        stamps.claim("gs://bucket/eval/sft", {"a": 2}, output_exists=True)

    keys = {k: np.arange(4).reshape(2, 2) for k in SavedRollouts.KEYS}
    for step in (2, 1):
        save_rollouts("gs://bucket/run/rollouts", step, keys)
    assert sorted(os.listdir(fake_gcs / "bucket" / "run" / "rollouts")) == [
        "step_000001.npz", "step_000002.npz"]  # fmt: skip
    saved = SavedRollouts("gs://bucket/run/rollouts")
    assert saved.files == ["gs://bucket/run/rollouts/step_000001.npz",
                           "gs://bucket/run/rollouts/step_000002.npz"]  # fmt: skip
    assert next(saved)["tokens"].tolist() == [[0, 1], [2, 3]]


def test_sentencepiece_on_gcs(fake_gcs):
    from metastone_jax.data.spm_train import train_sentencepiece

    texts = [f"{a} + {b} = {a + b}.\n\n<think>ok</think>" for a in range(30) for b in range(5)]
    tok = train_sentencepiece(texts, "gs://bucket/run/tokenizer", vocab_size=300)
    assert tok.decode(tok.encode("12 + 3 = 15")) == "12 + 3 = 15"
    assert sorted(os.listdir(fake_gcs / "bucket" / "run" / "tokenizer")) == [
        "tokenizer.model", "tokenizer_config.json"]  # fmt: skip
