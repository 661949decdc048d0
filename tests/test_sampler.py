"""The jitted sampler against the full forward: greedy, seeds, in-loop step scores, budgets."""

import jax
import numpy as np
import pytest
from flax import nnx
from tolerances import (
    fp32_reduction_tol,
    logit_bound,
    logprob_tol,
    score_tol,
    sprm_head_terms,
    transformer_terms,
)

from metastone_jax.config import ModelConfig
from metastone_jax.model import create_model
from metastone_jax.sample import processors, sampler
from metastone_jax.sample.processors import SamplingParams
from metastone_jax.sharding import make_mesh
from metastone_jax.sprm.steps import StepTokens, step_mask

# A 12-token vocabulary so that step tokens, runs of them and think tags occur often:
# 0 pad, 1 eos, 5 step token, 6 <think>, 7 </think>, the rest text.
CFG = ModelConfig(
    vocab_size=12, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
    max_len=160, compute_dtype="float32", pad_token_id=0, eos_token_id=1,
)  # fmt: skip
STEP = StepTokens(step_ids=(5,), think_open=6, think_close=7)
PROMPTS = [[2, 3, 4, 6], [3, 8, 9, 10, 2, 5, 6], [4, 6]]  # each ends with <think>
# fp32 terms on the way to a feature (L - 1 blocks) and to a step score (then the head), with
# attention over at most max_len slots: the sampler's cache and the full forward's width.
FEATURE_TERMS = transformer_terms(CFG, CFG.max_len, n_layers=CFG.n_layers - 1, lm_head=False)
SCORE_TERMS = FEATURE_TERMS + sprm_head_terms(CFG.d_model)


@pytest.fixture(scope="module")
def model():
    return create_model(CFG, seed=0)


@jax.jit
def _forward(graphdef_state, tokens, valid):
    out = nnx.merge(*graphdef_state)(tokens, valid=valid)
    return out.logits, out.features


def full_forward(model, seq, width=160):
    """Unpadded-equivalent full forward, right-padded to a fixed width (one compilation)."""
    tokens = np.zeros((1, width), np.int32)
    tokens[0, : len(seq)] = seq
    valid = np.arange(width)[None] < len(seq)
    logits, feats = _forward(nnx.split(model), tokens, valid)
    return np.asarray(logits[0, : len(seq)]), np.asarray(feats[0, : len(seq)])


@pytest.fixture(params=[64, 4], ids=["cache-whole", "cache-grows"])
def grow_slots(request, monkeypatch):
    """The default first cache (room for every new token here) and one that starts with 4
    slots past the prompt and grows several times."""
    monkeypatch.setattr(sampler, "GROW_SLOTS", request.param)
    return request.param


def test_greedy_equals_argmax_of_full_forward(model, grow_slots):
    params = SamplingParams(temperature=0.0, max_new_tokens=20, stop_ids=(1,))
    cands = sampler.generate(model, PROMPTS, k=2, params=params, step=STEP)
    for i, prompt in enumerate(PROMPTS):
        seq = list(prompt)
        for _ in range(cands.length[i, 0]):
            logits, _ = full_forward(model, seq)
            seq.append(int(logits[-1].argmax()))
            if seq[-1] == 1:
                break
        generated = seq[len(prompt) :]
        for j in range(2):  # both candidates are the greedy sequence
            assert cands.tokens[i, j, : cands.length[i, j]].tolist() == generated


def test_sampling_is_reproducible_and_per_request(model):
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=16)
    a = sampler.generate(model, PROMPTS, k=3, params=params, step=STEP, seeds=[1, 2, 3])
    b = sampler.generate(model, PROMPTS, k=3, params=params, step=STEP, seeds=[1, 2, 3])
    np.testing.assert_array_equal(a.tokens, b.tokens)
    c = sampler.generate(model, PROMPTS, k=3, params=params, step=STEP, seeds=[1, 9, 3])
    assert not np.array_equal(a.tokens[1], c.tokens[1])  # other seed, other samples
    # Same bucket width, so the same prompt with the same seed samples the same tokens even
    # when the rest of the batch changes.
    np.testing.assert_array_equal(a.tokens[0], c.tokens[0])
    assert len({tuple(t) for t in a.tokens[0]}) == 3  # the k candidates differ


def test_in_loop_step_scores_equal_full_forward_rescoring(model, grow_slots):
    params = SamplingParams(temperature=1.0, max_new_tokens=64)  # no stop: long sequences
    cands = sampler.generate(model, PROMPTS, k=24, params=params, step=STEP, seeds=[0, 1, 2])
    seen = dict(runs=0, after_open=0, after_close=0, several=0, not_one_each=0)
    max_diff, compared = 0.0, 0
    for i, prompt in enumerate(PROMPTS):
        for j in range(24):
            gen = cands.tokens[i, j, : cands.length[i, j]].tolist()
            seq = np.asarray(prompt + gen)
            mask = np.array(step_mask(seq[None], STEP, mode="inference"))[0]
            mask[: len(prompt)] = False  # the sampler scores generated tokens only
            _, feats = full_forward(model, seq.tolist())
            ref = jax.nn.sigmoid(model.sprm_logits(feats[np.flatnonzero(mask) - 1]))
            ours = cands.step_scores[i, j][cands.step_mask[i, j]]
            assert len(ours) == mask.sum()
            assert (
                cands.step_index[i, j][cands.step_mask[i, j]].tolist()
                == (np.flatnonzero(mask) - len(prompt)).tolist()
            )
            if len(ours):
                max_diff = max(max_diff, float(np.abs(np.asarray(ref) - ours).max()))
                compared += len(ours)
            # Coverage of the cases the rules distinguish (asserted below, so not vacuous).
            is_step = seq == 5
            seen["runs"] += int(np.any(is_step[1:] & is_step[:-1]))
            seen["after_open"] += int(np.any(is_step[1:] & (seq[:-1] == 6)))
            close = np.flatnonzero(seq == 7)
            seen["after_close"] += int(len(close) > 0 and np.any(is_step[close[-1] :]))
            seen["several"] += int(mask.sum() >= 3)
            seen["not_one_each"] += int((seq == 6).sum() != 1 or (seq == 7).sum() != 1)
    # The loop's cache and the full forward add the same terms in other orders.
    assert max_diff <= score_tol(SCORE_TERMS, cands.step_scores) and compared > 50
    assert all(v > 0 for v in seen.values()), seen


def test_second_token_of_the_sequence_is_never_scored(model):
    """One-token prompts put the first generated token at sequence position 1: without exactly
    one <think> the released scorer never scores it (its features start at 1), nor does the
    sampler's final mask. Rows are left-padded beside a longer prompt; step_mask on the
    unpadded prompt + response is the reference (tests/test_sprm.py checks it against the
    released scorer's rule)."""
    params = SamplingParams(temperature=1.0, max_new_tokens=6)
    prompts = [[2], [8], [9, 3, 4, 2]]
    state, opts, graphdef, weights = sampler.start(
        model, prompts, k=48, params=params, step=STEP, seeds=[3, 4, 5]
    )
    state = sampler.run_decode(graphdef, weights, state, opts)
    cands = sampler.to_candidates(state, len(prompts), 48)
    running = np.asarray(state.running.count).reshape(len(prompts), 48)
    first_step_unscored = running_skipped = 0
    for i, prompt in enumerate(prompts):
        for j in range(48):
            gen = cands.tokens[i, j, : cands.length[i, j]].tolist()
            seq = np.asarray(prompt + gen)
            want = np.array(step_mask(seq[None], STEP, mode="inference"))[0][len(prompt) :]
            recorded = cands.step_index[i, j][cands.step_mask[i, j]]
            assert recorded.tolist() == np.flatnonzero(want).tolist(), (prompt, gen)
            if not np.isin(seq, (6, 7)).any():  # no tags: the search's running score agrees
                assert running[i, j] == want.sum(), (prompt, gen)
                running_skipped += len(prompt) == 1 and gen[0] == 5
            if len(prompt) == 1 and gen[0] == 5 and (seq == 6).sum() != 1:
                assert 0 in cands.step_index[i, j]  # recorded in the loop, not counted
                first_step_unscored += 1
    # The cases are exercised (2 rows each with these seeds).
    assert first_step_unscored > 0 and running_skipped > 0


def test_kept_step_features_are_the_full_forward_features_the_head_scored(model):
    params = SamplingParams(temperature=1.0, max_new_tokens=48)
    plain = sampler.generate(model, PROMPTS, k=8, params=params, step=STEP, seeds=[4, 5, 6])
    kept = sampler.generate(model, PROMPTS, k=8, params=params, step=STEP, seeds=[4, 5, 6],
                            keep_features=True)  # fmt: skip
    assert plain.step_features is None
    np.testing.assert_array_equal(kept.tokens, plain.tokens)  # keeping them changes no sample
    np.testing.assert_array_equal(kept.step_scores, plain.step_scores)
    compared = 0
    for i, prompt in enumerate(PROMPTS):
        for j in range(8):
            gen = kept.tokens[i, j, : kept.length[i, j]].tolist()
            n = int(min((kept.step_index[i, j] >= 0).sum(), kept.step_index.shape[-1]))
            if n == 0:
                continue
            # The feature that scores the step token at generated index t is the full forward's
            # at the token before it (sequence position len(prompt) + t - 1).
            _, feats = full_forward(model, prompt + gen)
            at = len(prompt) + kept.step_index[i, j, :n] - 1
            tol = fp32_reduction_tol(FEATURE_TERMS, np.abs(feats[at]).max())  # max |feature|
            np.testing.assert_allclose(kept.step_features[i, j, :n], feats[at], rtol=0, atol=tol)
            compared += n
    assert compared > 30
    # The head on the kept features gives the in-loop scores (how other heads rescore).
    rescored = jax.nn.sigmoid(model.sprm_logits(kept.step_features))
    recorded = kept.step_index >= 0
    tol = score_tol(sprm_head_terms(CFG.d_model), kept.step_scores)  # the head, batched anew
    np.testing.assert_allclose(np.asarray(rescored)[recorded], kept.step_scores[recorded],
                               rtol=0, atol=tol)  # fmt: skip


def test_thinking_budget_forces_think_close(model):
    params = SamplingParams(temperature=1.0, max_new_tokens=30, think_budget=5)
    cands = sampler.generate(model, PROMPTS, k=4, params=params, step=STEP, seeds=[4, 5, 6])
    for i in range(len(PROMPTS)):
        for j in range(4):
            gen = cands.tokens[i, j, : cands.length[i, j]].tolist()
            assert 7 in gen[:6], gen  # </think> within budget + 1 tokens


def test_stop_tokens_and_finish_reasons(model):
    params = SamplingParams(temperature=1.0, max_new_tokens=40, stop_ids=(1, 3))
    cands = sampler.generate(model, PROMPTS, k=8, params=params, step=STEP, seeds=[0, 1, 2])
    for i in range(len(PROMPTS)):
        for j in range(8):
            n = cands.length[i, j]
            gen = cands.tokens[i, j, :n]
            if sampler.FINISH_REASONS[cands.finish[i, j]] == "stop":
                assert gen[-1] in (1, 3) and not np.isin(gen[:-1], (1, 3)).any()
            else:
                assert n == 40 and not np.isin(gen, (1, 3)).any()
            assert (cands.tokens[i, j, n:] == 0).all()


def test_logprob_is_sum_of_sampled_token_logprobs_greedy(model):
    params = SamplingParams(temperature=0.0, max_new_tokens=8)
    cands = sampler.generate(model, PROMPTS[:1], k=1, params=params, step=STEP)
    seq = list(PROMPTS[0])
    total = 0.0
    for t in cands.tokens[0, 0, : cands.length[0, 0]]:
        logits, _ = full_forward(model, seq)
        total += float(jax.nn.log_softmax(logits[-1])[t])
        seq.append(int(t))
    # Each token's log-prob from the loop's cache vs a full forward; their errors add up.
    n_tokens = int(cands.length[0, 0])
    token_tol = logprob_tol(transformer_terms(CFG, CFG.max_len), CFG.vocab_size, logit_bound(model))
    assert abs(total - cands.logprob[0, 0]) <= n_tokens * token_tol


# k=32 with top-p: 64 rows, which one device filters in row blocks (blocks made small here)
# and the mesh does not. The prompts' shared cache lies over the rows' mesh axes as far as their
# count divides them: 2 prompts over data, 4 over data*fsdp, 3 replicated.
@pytest.mark.parametrize(
    "k, top_p, grow, n_prompts", [(4, 1.0, 4, 2), (32, 0.9, 64, 2), (2, 1.0, 4, 4), (4, 1.0, 4, 3)]
)
def test_sharded_sampling_equals_single_device(k, top_p, grow, n_prompts, monkeypatch):
    monkeypatch.setattr(processors, "TOP_P_BLOCK_ELEMENTS", 16 * CFG.vocab_size)
    monkeypatch.setattr(sampler, "GROW_SLOTS", grow)  # 4: the cache grows on the mesh too
    sampler._jitted.cache_clear()  # the block size is read at trace time
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    params = SamplingParams(temperature=1.0, top_p=top_p, max_new_tokens=12)
    prompts, seeds = (PROMPTS + [[2, 6]])[:n_prompts], [7, 8, 9, 10][:n_prompts]
    single = sampler.generate(create_model(CFG, seed=0), prompts, k=k, params=params,
                              step=STEP, seeds=seeds)  # fmt: skip
    sharded_model = create_model(CFG, seed=0, mesh=mesh)
    sharded = sampler.generate(sharded_model, prompts, k=k, params=params, step=STEP,
                               seeds=seeds, mesh=mesh)  # fmt: skip
    np.testing.assert_array_equal(single.tokens, sharded.tokens)
    tol = score_tol(SCORE_TERMS, single.step_scores)  # the mesh reorders the sums
    np.testing.assert_allclose(single.step_scores, sharded.step_scores, rtol=0, atol=tol)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            dict(prompts=[[2] * 150]),
            r"prompt 0 has 150 tokens; with max_new_tokens=20 .* max_len=160",
        ),
        (dict(prompts=[[2, 3], []]), r"prompt 1 is empty"),
        (dict(k=0), r"k: expected >= 1"),
        (dict(seeds=[1, 2, 3]), r"seeds: expected one per prompt \(2\)"),
    ],
)
def test_bad_input(model, kwargs, match):
    args = dict(prompts=[[2, 3], [4]], k=2, seeds=0)
    args.update(kwargs)
    params = SamplingParams(temperature=1.0, max_new_tokens=20)
    with pytest.raises(ValueError, match=match):
        sampler.generate(model, args.pop("prompts"), params=params, step=STEP, **args)


def test_batch_that_cannot_be_laid_on_the_mesh(model):
    mesh = make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    params = SamplingParams(temperature=1.0, max_new_tokens=4)
    with pytest.raises(ValueError, match=r"3 prompts x k=2 = 6 candidates cannot be laid"):
        sampler.generate(model, PROMPTS, k=2, params=params, step=STEP, mesh=mesh)


def test_prefill_never_holds_the_prompt_logits():
    """Only the last prompt position predicts a token, so prefill applies the LM head to it
    alone: XLA's temporaries stay under one [B, P, V] fp32 array (V 32768, P 512: 256 MiB)."""
    cfg = ModelConfig(
        vocab_size=32768, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
        max_len=1024, compute_dtype="float32",
    )  # fmt: skip
    model = create_model(cfg, seed=0)
    graphdef, state = nnx.split(model)
    opts = sampler.DecodeOptions(
        params=SamplingParams(temperature=1.0, max_new_tokens=8),
        step=StepTokens(step_ids=(5,), think_open=None, think_close=None),
    )
    tokens = jax.ShapeDtypeStruct((4, 512), np.int32)
    valid = jax.ShapeDtypeStruct((4, 512), bool)
    fn = jax.jit(lambda s, t, v: sampler.prefill(graphdef, s, t, v, k=2, cache_len=520, opts=opts))
    temp = fn.lower(state, tokens, valid).compile().memory_analysis().temp_size_in_bytes
    assert temp < 4 * 512 * 32768 * 4, temp


def _eqns(jaxpr):
    """Every equation of a jaxpr and of the jaxprs nested in it (loop bodies, conds, ...)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    yield from _eqns(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    yield from _eqns(sub)


def test_decode_loop_never_slices_the_stacked_weights(model):
    """On CPU the per-layer weights are cut out of the stacked [L, ...] ones before the decode
    loop: a slice inside the body copies every weight matrix each step (Transformer.layer_params).
    So no equation inside the while loop may read an array shaped like a stacked weight."""
    params = SamplingParams(temperature=1.0, max_new_tokens=4)
    state, opts, graphdef, model_state = sampler.start(
        model, PROMPTS[:1], k=4, params=params, step=STEP
    )
    stacked = {tuple(x.shape) for x in jax.tree.leaves(nnx.state(model.blocks))}
    assert all(s[0] == CFG.n_layers for s in stacked)
    jaxpr = jax.make_jaxpr(lambda p, s: sampler.decode(graphdef, p, s, opts))(model_state, state)
    loops = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "while"]
    assert len(loops) == 1
    body = loops[0].params["body_jaxpr"].jaxpr
    read = [
        (e.primitive.name, tuple(v.aval.shape))
        for e in _eqns(body)
        for v in e.invars
        if hasattr(v, "aval") and tuple(getattr(v.aval, "shape", ())) in stacked
    ]
    assert not read, read


def test_growing_cache_gives_the_candidates_of_a_whole_one(model, monkeypatch):
    """A cache that starts small and doubles while candidates run samples exactly what one
    cache of the whole budget does; a batch that stops before the first cache fills never
    grows it."""
    grown = []
    grow = sampler._grow
    monkeypatch.setattr(sampler, "_grow", lambda s, n: grown.append(n) or grow(s, n))
    for stop_ids in ((), (1,)):  # every candidate runs to the budget; most stop early
        params = SamplingParams(temperature=1.0, top_p=0.9, repetition_penalty=1.05,
                                max_new_tokens=40, stop_ids=stop_ids)  # fmt: skip
        out = {}
        for slots in (0, 4):  # 0: the whole budget at once
            grown.clear()
            monkeypatch.setattr(sampler, "GROW_SLOTS", slots)
            out[slots] = sampler.generate(
                model, PROMPTS, k=5, params=params, step=STEP, seeds=[4, 5, 6]
            )
        a, b = out[0], out[4]
        if not stop_ids:  # 4 slots per row past the shared prompt, doubling to 40
            assert grown == [8, 16, 32, 40] and (a.length == 40).all()
        else:
            assert len(set(a.length.ravel())) > 3
        for name in ("tokens", "length", "finish", "step_index", "step_mask"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
        # Attention over 8..40 slots or all of them at once: sums in other orders. A
        # candidate's log-prob adds max_new_tokens token log-probs, their errors too.
        n_logit = transformer_terms(CFG, CFG.max_len)
        tol = params.max_new_tokens * logprob_tol(n_logit, CFG.vocab_size, logit_bound(model))
        np.testing.assert_allclose(a.logprob, b.logprob, rtol=0, atol=tol)
        tol = score_tol(SCORE_TERMS, a.step_scores)
        np.testing.assert_allclose(a.step_scores, b.step_scores, rtol=0, atol=tol)
    grown.clear()
    monkeypatch.setattr(sampler, "GROW_SLOTS", 8)
    eos_now = SamplingParams(temperature=1.0, max_new_tokens=40, stop_ids=tuple(range(12)))
    cands = sampler.generate(model, PROMPTS, k=2, params=eos_now, step=STEP)
    assert (cands.length == 1).all() and grown == []


def test_cache_grows_one_layer_per_call(model):
    """Growing the cache frees each layer's old k and v once their grown copies exist (the
    whole old cache no longer sits beside the new one); the grown cache is the old one with
    empty slots after it."""
    params = SamplingParams(temperature=1.0, max_new_tokens=20)
    state, _, _, _ = sampler.start(model, PROMPTS, k=2, params=params, step=STEP, seeds=[1, 2, 3])
    old = jax.tree.map(np.asarray, (state.cache.k, state.cache.v, state.cache.valid))
    slots, before = state.cache.max_len, state.cache
    grown = sampler._grow(state, slots + 8).cache
    assert all(x.is_deleted() for x in before.k + before.v)
    for new, ref in zip(grown.k + grown.v, old[0] + old[1], strict=True):
        axis = 3 if new.shape[3] != ref.shape[3] else 2
        pad = [(0, 0)] * 4
        pad[axis] = (0, 8)
        np.testing.assert_array_equal(np.asarray(new), np.pad(ref, pad))
    np.testing.assert_array_equal(np.asarray(grown.valid), np.pad(old[2], ((0, 0), (0, 8))))
