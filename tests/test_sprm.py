"""Step masks, feature shift, aggregation and selection (sprm/steps.py, sprm/aggregation.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tolerances import EPS32, fp32_reduction_tol

from metastone_jax.sprm.aggregation import AGGREGATIONS, RunningScore, aggregate, select
from metastone_jax.sprm.steps import StepTokens, shift_for_scoring, step_mask

# Tiny vocab for hand-made sequences: '_' padding, 'a'/'b' words, 'S'/'s' two step ids,
# '<' <think>, '>' </think>.
VOCAB = {"_": 0, "a": 1, "b": 2, "S": 3, "s": 4, "<": 5, ">": 6}
STEP = StepTokens(step_ids=(4, 3), think_open=5, think_close=6)
# One compile per shape instead of one per op and shape: keeps the many small cases fast.
step_mask_jit = jax.jit(step_mask, static_argnames=("step", "mode"))


def enc(text, pad="_", length=None):
    """tokens [1, T], valid [1, T]: '_' is padding, carrying the id of ``pad``; ``length``
    right-pads with more padding."""
    text = text.ljust(length or len(text), "_")
    tokens = [VOCAB[pad if c == "_" else c] for c in text]
    valid = [c != "_" for c in text]
    return np.array([tokens]), np.array([valid])


def marks(want):
    """'.'/'^' string -> bool [1, T]."""
    assert set(want) <= {".", "^"}
    return np.array([[c == "^" for c in want]])


def run(text, mode, pad="_", response_start=None):
    """The mask of one hand-made sequence as a '.'/'^' string.

    Every sequence is right-padded (invalid) to one length, so the whole table costs one
    compile per mode; trailing padding is "nothing" and cannot change the mask.
    """
    tokens, valid = enc(text, pad, length=HAND_T)
    rs = None if response_start is None else np.array([response_start])
    out = step_mask_jit(tokens, STEP, mode=mode, valid=valid, response_start=rs)
    return "".join("^" if m else "." for m in np.asarray(out)[0])[: len(text)]


HAND_T = 12


# (sequence, expected train mask, expected inference mask), computed by hand.
CASES = {
    # Rule 1: only the first of a run counts; 'S' and 's' are both step ids, so "Ss" is a run.
    "run": ("<aSSSaSsa>", "..^...^...", "..^...^..."),
    # Rule 2: a step token right after <think> does not count, nor does the rest of its run.
    "after_open": ("<SSaS>", "....^.", "....^."),
    # Rule 3: steps before <think> and after </think> are outside the span.
    "outside": ("aS<aS>aSb", "....^....", "....^...."),
    # No think tags: train falls back to [0, T-1]; inference to the whole sequence but its
    # second token (the released scorer's features start at 1: the token at t=1 never counts).
    "no_tags": ("aSaaSSbS", ".^..^..^", "....^..^"),
    # Two of each: train uses first <think> .. last </think>; inference the whole sequence.
    "two_each": ("aS<aS>aS<aS>", "....^..^..^.", "....^..^..^."),
    # Two <think>, one </think>: at inference only the </think> bound applies.
    "two_open": ("aS<aS<aS>aS", "....^..^...", "....^..^..."),
    # One <think>, two </think>: at inference only the <think> bound applies.
    "two_close": ("aS<aS>aS>aS", "....^..^...", "....^..^..^"),
    # Only </think>: lower bound is the sequence start (inference: past its second token).
    "close_only": ("aSaS>aS", ".^.^...", "...^..."),
    # Without exactly one <think>, the third token is the first that can count.
    "third_token": ("aaSaS", "..^.^", "..^.^"),
    # Only <think>: upper bound is the sequence end in both modes.
    "open_only": ("aS<aSaS", "....^.^", "....^.^"),
    # </think> before <think>: empty range.
    "reversed": ("aS>aS<aS", "........", "........"),
    # A step at t=0 has no feature before it, so it is never scored.
    "first_token": ("SaS", "..^", "..^"),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("mode", ["train", "inference"])
def test_hand_cases(name, mode):
    text, want_train, want_inf = CASES[name]
    assert run(text, mode) == (want_train if mode == "train" else want_inf)


def test_prompt_steps_excluded_in_training():
    # Template-style prompt ending inside the think span: steps at 2, 4, 6; prompt is t < 4.
    assert run("<aSaSaSa>", "train") == "..^.^.^.."
    assert run("<aSaSaSa>", "train", response_start=4) == "....^.^.."
    assert run("<aSaSaSa>", "train", response_start=5) == "......^.."


def test_response_start_per_row():
    tokens = np.array([enc("<aSaSaSa>")[0][0]] * 3)
    out = step_mask_jit(tokens, STEP, mode="train", response_start=np.array([0, 4, 9]))
    np.testing.assert_array_equal(
        out, np.concatenate([marks("..^.^.^.."), marks("....^.^.."), marks(".........")])
    )


def test_padding_never_counts():
    # Left padding filled with <think> ids: counted, there would be four <think>s.
    assert run("___aS<aSaS>", "inference", pad="<") == ".......^.^."
    assert run("___aS<aSaS>", "train", pad="<") == ".......^.^."
    # Right padding filled with </think> ids: counted, it would extend the training span.
    assert run("<aSaS>aS__", "train", pad=">") == "..^.^....."
    # Padding filled with step ids: not a previous step token, and never a step itself.
    assert run("__aS<aS>__", "train", pad="S") == "......^..."
    # The first real token has "nothing" before it (no feature), even after padding 'a's.
    assert run("__Sa", "inference", pad="a") == "...."
    assert run("__aS", "train", pad="a") == "...^"
    # The second real token (t=3 here, after the padding) is never scored at inference
    # without exactly one <think>; the third is.
    assert run("__aS", "inference", pad="a") == "...."
    assert run("__aaS", "inference", pad="a") == "....^"


def test_range_inclusive_in_training_half_open_at_inference():
    # Only visible when the tags themselves are step ids: '<' and '>' count as steps here.
    # The released scorer keeps feature positions <think> < p < </think>, i.e. tokens
    # <think> + 1 < t <= </think>: the </think> counts, the <think> does not.
    step = StepTokens(step_ids=(3, 5, 6), think_open=5, think_close=6)
    tokens, _ = enc("a<aSa>")
    np.testing.assert_array_equal(step_mask_jit(tokens, step, mode="train"), marks(".^.^.^"))
    np.testing.assert_array_equal(step_mask_jit(tokens, step, mode="inference"), marks("...^.^"))


def test_unknown_mode():
    with pytest.raises(ValueError, match="train"):
        step_mask(np.zeros((1, 3), int), STEP, mode="eval")


def test_no_think_ids():
    step = StepTokens(step_ids=(3,))
    tokens, _ = enc("aS<aS>S")  # '<'/'>' are ordinary tokens here
    np.testing.assert_array_equal(step_mask_jit(tokens, step, mode="train"), marks(".^..^.^"))
    # No <think> id means no <think>: the inference fallback skips the second token.
    np.testing.assert_array_equal(step_mask_jit(tokens, step, mode="inference"), marks("....^.^"))


# ---------------------------------------------------------------------------------------------
# Property test against a loop reference written from docs/method.md section 2
# ---------------------------------------------------------------------------------------------


def reference_mask(seq, valid, mode, response_start):
    T = len(seq)
    steps = {VOCAB["S"], VOCAB["s"]}
    opens = [t for t in range(T) if valid[t] and seq[t] == VOCAB["<"]]
    closes = [t for t in range(T) if valid[t] and seq[t] == VOCAB[">"]]
    out = []
    for t in range(T):
        ok = bool(valid[t]) and seq[t] in steps
        has_prev = t > 0 and bool(valid[t - 1])
        prev = seq[t - 1] if has_prev else None
        ok = ok and has_prev and prev not in steps and prev != VOCAB["<"]
        if mode == "train":
            lo = opens[0] if opens else 0
            hi = closes[-1] if closes else T - 1
            ok = ok and lo <= t <= hi
        else:
            reals = [u for u in range(T) if valid[u]]
            second = reals[1] if len(reals) > 1 else T
            lo = opens[0] if len(opens) == 1 else second
            hi = closes[0] if len(closes) == 1 else T
            ok = ok and lo < t <= hi
        if response_start is not None:
            ok = ok and t >= response_start
        out.append(ok)
    return out


def random_batch(rng, B, T):
    probs = np.array([0.0, 0.2, 0.15, 0.2, 0.15, 0.15, 0.15])
    tokens = rng.choice(len(probs), size=(B, T), p=probs)
    valid = np.ones((B, T), bool)
    for b in range(B):
        kind = b % 3
        if kind == 1:  # left + right padding, as a batched prompt + response
            left, right = rng.integers(0, T // 2 + 1, size=2)
            valid[b, :left] = False
            valid[b, T - right :] = False
        elif kind == 2:  # arbitrary holes
            valid[b] = rng.random(T) < 0.8
    tokens = np.where(valid, tokens, rng.integers(0, 7, size=(B, T)))  # junk in padding
    return tokens, valid


@pytest.mark.parametrize("T", [1, 3, 16])
@pytest.mark.parametrize("mode", ["train", "inference"])
def test_matches_reference(T, mode):
    rng = np.random.default_rng(T + (mode == "train"))
    B = 300
    tokens, valid = random_batch(rng, B, T)
    rs = rng.integers(0, T + 1, size=B)
    for response_start in (None, rs):
        got = np.asarray(
            step_mask_jit(tokens, STEP, mode=mode, valid=valid, response_start=response_start)
        )
        for b in range(B):
            want = reference_mask(
                tokens[b], valid[b], mode, None if response_start is None else rs[b]
            )
            assert got[b].tolist() == want, (tokens[b], valid[b], response_start)
    if T >= 5:  # the random data does produce scored steps
        assert got.any()


def released_scorer_tokens(seq, steps, open_id, close_id):
    """Token positions the released inference scorer scores in the unpadded ``seq``, written
    from test/score_model_queue.py: a token mask (step, first of its run, not right after
    <think>) moved to feature positions p = t - 1, kept for start < p < end with start the
    only <think> (else 0) and end the only </think> (else the length)."""
    n = len(seq)
    token = [
        seq[t] in steps and not (t > 0 and (seq[t - 1] in steps or seq[t - 1] == open_id))
        for t in range(n)
    ]
    feature = token[1:] + [False]
    opens = [t for t in range(n) if seq[t] == open_id]
    closes = [t for t in range(n) if seq[t] == close_id]
    start = opens[0] if len(opens) == 1 else 0
    end = closes[0] if len(closes) == 1 else n
    return [p + 1 for p in range(start + 1, end) if feature[p]]


def test_inference_mask_equals_released_scorer_unpadded_and_left_padded():
    rng = np.random.default_rng(7)
    probs = np.array([0.0, 0.3, 0.1, 0.25, 0.15, 0.1, 0.1])
    B, T = 400, 12
    tokens = np.zeros((B, T), np.int64)
    valid = np.zeros((B, T), bool)
    seqs = []
    for b in range(B):
        n = int(rng.integers(2, T + 1))
        seq = rng.choice(7, size=n, p=probs)
        seq[: int(rng.integers(0, 3))] = rng.choice([3, 4], size=1)  # steps at t = 0, 1
        left = T - n if b % 2 else 0  # prompt-major rows are left-padded
        tokens[b, left : left + n], valid[b, left : left + n] = seq, True
        tokens[b, :left] = rng.integers(0, 7, size=left)  # junk under the padding
        seqs.append((left, seq.tolist()))
    got = np.asarray(step_mask_jit(tokens, STEP, mode="inference", valid=valid))
    second_token_cases = 0
    for b, (left, seq) in enumerate(seqs):
        want = released_scorer_tokens(seq, {3, 4}, 5, 6)
        assert (np.flatnonzero(got[b]) - left).tolist() == want, (seq, left)
        second_token_cases += seq[1] in (3, 4) and seq[0] not in (3, 4, 5)
    assert second_token_cases > 20  # the rule the fallback start decides is exercised


def test_jit_matches_eager():
    rng = np.random.default_rng(0)
    tokens, valid = random_batch(rng, 32, 24)
    rs = rng.integers(0, 24, size=32)
    jitted = jax.jit(step_mask, static_argnames=("step", "mode"))
    for mode in ("train", "inference"):
        eager = step_mask(tokens, STEP, mode=mode, valid=valid, response_start=rs)
        jit_out = jitted(
            jnp.asarray(tokens), STEP, mode=mode, valid=jnp.asarray(valid), response_start=rs
        )
        np.testing.assert_array_equal(eager, jit_out)
        assert jit_out.dtype == jnp.bool_ and jit_out.shape == (32, 24)


def test_step_tokens_hashable_and_normalised():
    a = StepTokens(step_ids=[4, 3, np.int64(3)], think_open=np.int32(5), think_close=6)
    b = StepTokens(step_ids=(3, 4), think_open=5, think_close=6)
    assert a == b and hash(a) == hash(b) and a.step_ids == (3, 4)
    assert StepTokens(()).step_ids == ()
    assert not np.asarray(step_mask(enc("aSa")[0], StepTokens(()), mode="train")).any()


# ---------------------------------------------------------------------------------------------
# Feature positions
# ---------------------------------------------------------------------------------------------


def test_shift_for_scoring():
    # Step tokens at 2 and 5: scored by the features at 1 and 4; the last position scores
    # nothing.
    np.testing.assert_array_equal(shift_for_scoring(marks("..^..^")), marks(".^..^."))
    np.testing.assert_array_equal(shift_for_scoring(marks("....^")), marks("...^."))
    # End to end: score = head(features)[p] for the token p+1.
    tokens, _ = enc("<aSbaS>")
    feat_mask = shift_for_scoring(step_mask_jit(tokens, STEP, mode="inference"))
    np.testing.assert_array_equal(feat_mask, marks(".^..^.."))
    head_scores = np.array([[0.9, 0.5, 0.9, 0.9, 0.125, 0.9, 0.9]])
    np.testing.assert_allclose(aggregate(head_scores, feat_mask), 0.25, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Aggregation and selection
# ---------------------------------------------------------------------------------------------


def test_aggregate_hand_examples():
    p = np.array([0.5, 0.125])
    np.testing.assert_allclose(aggregate(p, how="geomean"), 0.25, rtol=1e-6)
    np.testing.assert_allclose(aggregate(p, how="mean"), 0.3125, rtol=1e-6)
    np.testing.assert_allclose(aggregate(p, how="product"), 0.0625, rtol=1e-6)
    np.testing.assert_allclose(aggregate(p, how="min"), 0.125)
    np.testing.assert_allclose(aggregate(p, how="last"), 0.125)

    q = np.array([0.1, 0.7, 0.3, 0.9])
    m = np.array([True, True, True, False])
    np.testing.assert_allclose(aggregate(q, m, "last"), 0.3, rtol=1e-6)
    np.testing.assert_allclose(aggregate(q, m, "min"), 0.1, rtol=1e-6)
    np.testing.assert_allclose(aggregate(q, m, "mean"), 1.1 / 3, rtol=1e-6)
    np.testing.assert_allclose(aggregate(q, m, "product"), 0.021, rtol=1e-5)
    np.testing.assert_allclose(aggregate(q, m, "geomean"), 0.021 ** (1 / 3), rtol=1e-5)
    # Only the masked step counts, wherever it is.
    np.testing.assert_allclose(aggregate(q, ~m, "last"), 0.9, rtol=1e-6)
    np.testing.assert_allclose(aggregate(q, ~m, "geomean"), 0.9, rtol=1e-6)


def test_aggregate_clamp_and_zero():
    # log(max(0, 1e-10)) = log(1e-10): the geometric mean of [0, 1] is 1e-5, not 0 or nan.
    np.testing.assert_allclose(aggregate(np.array([0.0, 1.0]), how="geomean"), 1e-5, rtol=1e-4)
    np.testing.assert_allclose(aggregate(np.array([1e-30]), how="geomean"), 1e-10, rtol=1e-4)
    assert float(aggregate(np.array([0.5, 0.0]), how="product")) == 0.0


@pytest.mark.parametrize("how", AGGREGATIONS)
def test_aggregate_empty_is_zero(how):
    scores = np.array([[0.3, 0.8], [0.3, 0.8]], np.float32)
    mask = np.array([[False, False], [True, False]])
    out = np.asarray(aggregate(scores, mask, how))
    assert out[0] == 0.0 and out[1] > 0.0
    assert float(aggregate(np.zeros((0,)), how=how)) == 0.0


def test_aggregate_leading_dims_and_unknown():
    scores = np.full((2, 3, 4), 0.5)
    assert aggregate(scores, np.ones((2, 3, 4), bool)).shape == (2, 3)
    with pytest.raises(ValueError, match="geomean.*mean.*min.*last.*product"):
        aggregate(scores, how="median")
    with pytest.raises(ValueError, match="geomean"):
        RunningScore.init((2,)).value("median")


def test_running_score_matches_aggregate():
    rng = np.random.default_rng(1)
    B, S = 16, 12
    scores = rng.random((B, S)).astype(np.float32)
    scores[0, 3] = 0.0  # clamp path (geomean) and an exact zero (product)
    mask = rng.random((B, S)) < 0.5
    mask[1] = False  # a candidate with no scored step
    mask[0, 3] = True

    def step(state, xs):
        s, m = xs
        return state.update(s, m), None

    state, _ = jax.jit(lambda xs: jax.lax.scan(step, RunningScore.init((B,)), xs))(
        (scores.T, mask.T)
    )
    # The scan adds the S steps one by one, aggregate in its own order: a sum of S logs (scale
    # max |log p|, clamped at 1e-10) moves exp(sum / n) relatively, then exp rounds; a sum of S
    # scores <= 1 and a division; min and last select a stored value exactly.
    log_scale = np.abs(np.log(np.maximum(scores, 1e-10))).max()
    log_rtol = fp32_reduction_tol(S, log_scale) + 2 * EPS32
    rtol = {"geomean": log_rtol, "product": log_rtol, "mean": fp32_reduction_tol(S + 1, 1.0),
            "min": 0.0, "last": 0.0}  # fmt: skip
    for how in AGGREGATIONS:
        np.testing.assert_allclose(
            state.value(how), aggregate(scores, mask, how), rtol=rtol[how], atol=0, err_msg=how
        )
    assert float(state.value("geomean")[1]) == 0.0 and float(state.value("product")[0]) == 0.0


def test_select_ties_first_and_nan():
    agg = np.array([[0.1, 0.5, 0.5], [0.3, 0.3, 0.3], [np.nan, 0.2, 0.1], [0.0, 0.0, 0.9]])
    np.testing.assert_array_equal(select(agg), [1, 0, 1, 2])
    np.testing.assert_array_equal(jax.jit(select)(agg), [1, 0, 1, 2])


# ---------------------------------------------------------------------------------------------
# Step ids from a tokenizer
# ---------------------------------------------------------------------------------------------


def _bpe(merge_step):
    from tokenizers import AddedToken, Tokenizer, models

    from metastone_jax.data.hf_tokenizer import HFTokenizer

    vocab = {c: i for i, c in enumerate(["a", "b", ".", "\n", ".\n", ".\n\n"])}
    merges = [(".", "\n"), (".\n", "\n")] if merge_step else []
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in ("<think>", "</think>")]
    )
    return HFTokenizer(backend)


def test_from_tokenizer_english():
    tok = _bpe(merge_step=True)
    step = StepTokens.from_tokenizer(tok)
    assert step == StepTokens((5,), think_open=6, think_close=7)
    ids = tok.encode("<think>a.\n\nb.\n\n.\n\n</think>a.\n\n")
    assert ids == [6, 0, 5, 1, 5, 5, 7, 0, 5]
    np.testing.assert_array_equal(
        step_mask_jit(np.array([ids]), step, mode="train"), [[0, 0, 1, 0, 1, 0, 0, 0, 0]]
    )
    # Explicit ids, and absent think tags.
    assert StepTokens.from_tokenizer(tok, step_text=[2, 4]).step_ids == (2, 4)
    none = StepTokens.from_tokenizer(tok, think_open="<t>", think_close="</t>")
    assert none.think_open is None and none.think_close is None
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        StepTokens.from_tokenizer(tok, step_text=[99])
    with pytest.raises(ValueError, match="'en' or 'zh'"):
        StepTokens.from_tokenizer(tok, variant="fr")


def test_from_tokenizer_step_not_one_token():
    tok = _bpe(merge_step=False)
    with pytest.raises(ValueError, match=r"single token.*3 ids \[2, 3, 3\]"):
        StepTokens.from_tokenizer(tok)


def test_from_tokenizer_step_lossy():
    from tokenizers import Tokenizer, models, pre_tokenizers

    from metastone_jax.data.hf_tokenizer import HFTokenizer

    # Whitespace pre-tokenization drops "\n\n": ".\n\n" encodes to the single id of ".".
    backend = Tokenizer(models.WordLevel({"a": 0, ".": 1}, unk_token="a"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(ValueError, match="decodes to '.'"):
        StepTokens.from_tokenizer(HFTokenizer(backend))


def test_from_tokenizer_chinese():
    from tokenizers import AddedToken, Tokenizer, models

    from metastone_jax.data.hf_tokenizer import HFTokenizer

    words = [
        "a",  # 0 no
        "\n",  # 1 yes
        "\u3002",  # 2 yes: 。
        "\u3002\n",  # 3 yes: one other character
        "\n\n\n",  # 4 yes: only newlines
        "\u597d\u3002",  # 5 yes: 好。
        "\u597d\u597d\u3002",  # 6 no: two other characters
        "a\nb",  # 7 no: two other characters
        "\n\n\n\n",  # 8 no: longer than 3
        "x\u3002\n",  # 9 no: two others whichever character is removed
        "\u3002\u3002\u3002",  # 10 yes
        ".",  # 11 no
    ]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="a"))
    backend.add_special_tokens([AddedToken("<think>", special=True, normalized=False)])
    step = StepTokens.from_tokenizer(HFTokenizer(backend), variant="zh")
    assert step.step_ids == (1, 2, 3, 4, 5, 10)
    assert step.think_open == 12 and step.think_close is None


def test_case_table_lengths():
    # Guard the table above: each expected mask has the sequence's length.
    for text, want_train, want_inf in CASES.values():
        assert len(text) == len(want_train) == len(want_inf), text
