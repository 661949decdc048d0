"""Head-only SPR training on cached step features.

With the backbone frozen (`optim.freeze_backbone`), the penultimate features of a rollout never
change, so `spr_step` would recompute the same forward pass every update. Here they are computed
once per rollout batch (`step_features`) and the SPRM head alone is trained on them
(`fit_head`) with the same `spr_loss` (filtered | paper | bce), the head's dropout and its own
AdamW + clipping: the updates equal a frozen-backbone `spr_step` on the same rows, at the cost
of a tiny MLP per update instead of a transformer forward and backward.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from metastone_jax.sprm.loss import FORMS, score_gap, spr_loss
from metastone_jax.sprm.steps import StepTokens, shift_for_scoring, step_mask


@dataclasses.dataclass
class StepFeatures:
    """Per trajectory: the features that score its steps, padded to S steps.

    features [N, S, D] float32; mask [N, S] bool (a real step); labels [N] (1 = correct final
    answer); include [N] bool (False: truncated and wrong, excluded from the SPR loss).
    """

    features: np.ndarray
    mask: np.ndarray
    labels: np.ndarray
    include: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, idx) -> StepFeatures:
        return StepFeatures(self.features[idx], self.mask[idx], self.labels[idx], self.include[idx])

    @staticmethod
    def concat(parts: list[StepFeatures]) -> StepFeatures:
        s = max(p.mask.shape[1] for p in parts)

        def pad(x, value):
            return np.pad(x, [(0, 0), (0, s - x.shape[1])] + [(0, 0)] * (x.ndim - 2),
                          constant_values=value)  # fmt: skip

        return StepFeatures(
            np.concatenate([pad(p.features, 0.0) for p in parts]),
            np.concatenate([pad(p.mask, False) for p in parts]),
            np.concatenate([p.labels for p in parts]),
            np.concatenate([p.include for p in parts]),
        )


def step_features(model, rows: dict[str, np.ndarray], step: StepTokens, *, batch: int = 64,
                  mode: str = "train", progress: bool = False):  # fmt: skip
    """Penultimate features at the step mask of packed rollout rows (`pack_rollouts`:
    tokens/valid [N, T], response_start [N], labels [N], include [N]) -> StepFeatures.
    mode: `sprm.steps.step_mask`'s "train" (what the SPR loss sees) or "inference" (what the sampler
    scores; they differ only for responses with more than one think tag)."""
    graphdef, params = nnx.split(model)

    @jax.jit
    def forward(params, tokens, valid, start):
        m = nnx.merge(graphdef, params)
        feats = m(tokens, valid=valid).features
        mask = step_mask(tokens, step, mode=mode, valid=valid, response_start=start)
        return feats, shift_for_scoring(mask)

    n = len(rows["labels"])
    parts = []
    for i in tqdm(range(0, n, batch), desc="step features", unit="batch", disable=not progress):
        sl = slice(i, min(i + batch, n))
        size = sl.stop - sl.start
        pad = batch - size  # one compiled shape: the last batch is padded with its first row

        def take(x, sl=sl, pad=pad):
            x = x[sl]
            return np.concatenate([x, np.repeat(x[:1], pad, axis=0)]) if pad else x

        feats, mask = jax.device_get(forward(params, take(rows["tokens"]), take(rows["valid"]),
                                             take(rows["response_start"])))  # fmt: skip
        feats, mask = np.asarray(feats[:size], np.float32), np.asarray(mask[:size])
        counts = mask.sum(1)
        s = max(int(counts.max()), 1)
        out = np.zeros((size, s, feats.shape[-1]), np.float32)
        out_mask = np.arange(s)[None, :] < counts[:, None]
        for r in range(size):
            out[r, : counts[r]] = feats[r, mask[r]]
        parts.append(StepFeatures(out, out_mask, rows["labels"][sl], rows["include"][sl]))
    return StepFeatures.concat(parts)


@dataclasses.dataclass(frozen=True)
class HeadFitConfig:
    form: str = "filtered"
    steps: int = 400
    batch: int = 256  # trajectories per update
    lr: float = 1e-3
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    # Updates with plain BCE before `form` takes over: the filter keeps only steps whose
    # prediction already agrees with the outcome, so from a random head it can lock onto one
    # class (the prototype collapsed to "always wrong"); a warm-up gives it a sound start.
    warmup_bce_steps: int = 0
    eval_every: int = 25
    dropout: bool = True  # the head's Dropout(0.5) in training, as in the released head
    seed: int = 0

    def __post_init__(self):
        if self.form not in FORMS:
            raise ValueError(f"form: expected one of {FORMS}, got {self.form!r}")


def fit_head(head, train: StepFeatures, cfg: HeadFitConfig, *, held_out: StepFeatures | None = None,
             progress=None) -> tuple[nnx.Module, list[dict]]:  # fmt: skip
    """Trains (a copy of) the SPRM head `head` on cached features -> (trained head, history).

    history: one row per `eval_every` updates with the step, the training loss and, on
    `held_out` (default: the training set), score_correct / score_incorrect / score_gap (the
    "aha" curve, `sprm.loss.score_gap`).
    """
    graphdef, params = nnx.split(head)
    tx = optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(cfg.lr, b1=0.9, b2=0.999, weight_decay=cfg.weight_decay),
    )
    opt_state = tx.init(params)
    held_out = train if held_out is None else held_out

    def make_update(form):
        def loss_fn(params, x, mask, labels, include, key):
            logits = nnx.merge(graphdef, params)(x, dropout_rng=key if cfg.dropout else None)
            return spr_loss(logits, mask, labels, include, form=form)

        @jax.jit
        def update(params, opt_state, x, mask, labels, include, key):
            (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                params, x, mask, labels, include, key
            )
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        return update

    warm, main = make_update("bce"), make_update(cfg.form)

    @jax.jit
    def gap(params, x, mask, labels, include):
        return score_gap(nnx.merge(graphdef, params)(x), mask, labels, include)

    rng = np.random.default_rng(cfg.seed)
    key = jax.random.key(cfg.seed)
    n = len(train)
    batch = min(cfg.batch, n)
    order, pos = rng.permutation(n), 0
    history: list[dict] = []
    loss = jnp.nan
    for i in range(cfg.steps + 1):
        if i % cfg.eval_every == 0 or i == cfg.steps:
            g = jax.device_get(gap(params, held_out.features, held_out.mask, held_out.labels,
                                   held_out.include))  # fmt: skip
            history.append({"step": i, "loss": float(loss), **{k: float(v) for k, v in g.items()}})
            if progress is not None:
                progress(history[-1])
        if i == cfg.steps:
            break
        if pos + batch > n:
            order, pos = rng.permutation(n), 0
        b = train.take(order[pos : pos + batch])
        pos += batch
        key, sub = jax.random.split(key)
        update = warm if i < cfg.warmup_bce_steps else main
        params, opt_state, loss = update(params, opt_state, b.features, b.mask, b.labels,
                                         b.include, sub)  # fmt: skip
    return nnx.merge(graphdef, params), history
