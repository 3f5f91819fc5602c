"""LoRA training: the loss, one jitted optimizer step, orbax checkpoints and the training loop.

* Loss: next-token cross entropy in f32 over the masked target tokens of packed rows (``data.py``),
  summed over all micro-batches of a step and divided by their total number of target tokens,
  so gradient accumulation equals one big batch exactly. The unembedding runs over chunks of
  ``loss_chunk`` tokens under ``jax.checkpoint``: ``[tokens, vocab]`` logits (201088 columns)
  are never held for the backward pass.
* Step: ``jax.value_and_grad`` over the adapter tree only; the base tree is an argument that is
  never differentiated, donated or written (it stays bit-identical). Compute in the base
  weights' dtype (bf16 for a bf16 model; adapters are f32 masters cast at use), blocks
  rematerialized (``Runtime(remat=True)``), micro-batches accumulated by ``lax.scan`` inside
  the step. optax: global-norm clipping, then AdamW on a linear-warmup + cosine schedule.
* Determinism: dropout keys are ``fold_in(fold_in(key(seed), step), micro)``; the data order is
  a function of (seed, epoch). Same seed, same data -> same losses and adapters; a run resumed
  from a checkpoint continues bit-identically.
* Checkpoints (orbax ``CheckpointManager``): adapters, optimizer state, step and PRNG key
  (``state``) plus the data position and the run's settings (``meta``, JSON). Orbax writes each
  step into a temporary directory and renames it when complete, so a run killed mid-save leaves
  the previous checkpoint as the latest one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gptoss_jax.finetune import lora
from gptoss_jax.finetune.checkpoints import Checkpoints
from gptoss_jax.finetune.data import ROW_FIELDS, PackedData, empty_rows
from gptoss_jax.model import transformer as M
from gptoss_jax.model.config import GptOssConfig
from gptoss_jax.model.sharding import param_shardings
from gptoss_jax.ops import runtime as ops_runtime


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    steps: int = 100  # optimizer steps
    lr: float = 2e-4  # peak learning rate
    warmup_steps: int = -1  # linear warmup; -1 = 5% of steps (at least 1)
    end_lr_ratio: float = 0.1  # the cosine decays to lr * end_lr_ratio at the last step
    weight_decay: float = 0.0  # AdamW decoupled weight decay on the adapters
    grad_clip: float = 1.0  # global-norm clip (0 = off)
    batch_size: int = 4  # rows per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    seq_len: int = 1024  # tokens per packed row
    seed: int = 0  # adapter init, dropout and data order
    loss_chunk: int = 512  # tokens per unembedding chunk in the loss

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum", "seq_len", "loss_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")

    @property
    def warmup(self) -> int:
        return max(1, self.steps // 20) if self.warmup_steps < 0 else self.warmup_steps

    @property
    def rows_per_step(self) -> int:
        return self.batch_size * self.grad_accum


def schedule(tc: TrainConfig) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        0.0, tc.lr, tc.warmup, max(tc.steps, tc.warmup + 1), end_value=tc.lr * tc.end_lr_ratio)


def optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    parts = [optax.clip_by_global_norm(tc.grad_clip)] if tc.grad_clip > 0 else []
    parts.append(optax.adamw(schedule(tc), b1=0.9, b2=0.999, eps=1e-8, weight_decay=tc.weight_decay))
    return optax.chain(*parts)


# ---------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------


def nll_sum(params: dict, rows: dict, c: GptOssConfig, rt: M.Runtime, chunk: int):
    """(sum of target-token negative log-likelihoods in f32, number of target tokens)."""
    x, _ = M.hidden_states(params, rows["tokens"], rows["positions"], c, rt=rt,
                           segment_ids=rows["segments"])
    d = x.shape[-1]
    x, targets, mask = x.reshape(-1, d), rows["targets"].reshape(-1), rows["loss_mask"].reshape(-1)
    n = x.shape[0]
    chunk = min(chunk, n)
    pad = -n % chunk
    if pad:
        x = jnp.pad(x, ((0, pad), (0, 0)))
        targets, mask = jnp.pad(targets, (0, pad)), jnp.pad(mask, (0, pad))

    @jax.checkpoint  # recompute each chunk's logits in the backward pass instead of storing them
    def chunk_nll(xc, tc, mc):
        logits = M.unembed(params, xc, rt)  # [chunk, v] f32
        picked = jnp.take_along_axis(logits, tc[:, None], axis=-1)[:, 0]
        return jnp.sum((jax.nn.logsumexp(logits, axis=-1) - picked) * mc)

    def body(total, xs):
        return total + chunk_nll(*xs), None

    total, _ = jax.lax.scan(body, jnp.float32(0.0),
                            (x.reshape(-1, chunk, d), targets.reshape(-1, chunk),
                             mask.reshape(-1, chunk)))
    return total, jnp.sum(mask)


def _loss_and_grads(adapters, base, batch, key, *, c, lc, rt, chunk):
    """Sum of NLL and gradients over the micro-batches ``batch[field]`` ``[A, B, L]``."""
    def micro(carry, xs):
        grads, total, count = carry
        rows, i = xs
        rng = jax.random.fold_in(key, i) if lc.dropout > 0 else None

        def f(ad):
            s, n = nll_sum(lora.inject(base, ad, lc, rng=rng), rows, c, rt, chunk)
            return s, n

        (s, n), g = jax.value_and_grad(f, has_aux=True)(adapters)
        return (jax.tree.map(jnp.add, grads, g), total + s, count + n), None

    zeros = jax.tree.map(jnp.zeros_like, adapters)
    steps = jnp.arange(batch["tokens"].shape[0])
    (grads, total, count), _ = jax.lax.scan(micro, (zeros, jnp.float32(0), jnp.float32(0)),
                                            (batch, steps))
    return grads, total, count


def state_shardings(c: GptOssConfig, lc: lora.LoraConfig, opt, opt_state, mesh):
    """``(adapters, optimizer state)`` shardings on ``mesh`` (None without one): the adapters'
    from their declared logical axes (``lora.declare``), each optimizer moment as its adapter,
    the optimizer's counters replicated."""
    if mesh is None:
        return None
    adapters = param_shardings(lora.declare(c, lc), mesh)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    moments = optax.tree_map_params(opt, lambda _, s: s, opt_state, adapters,
                                    transform_non_params=lambda _: replicated)
    return adapters, moments


def make_step(c: GptOssConfig, lc: lora.LoraConfig, tc: TrainConfig, opt, rt: M.Runtime,
              shardings=None):
    """``step(adapters, opt_state, base, batch, step, key) -> (adapters, opt_state, metrics)``,
    jitted; adapters and optimizer state are donated. ``shardings`` (``state_shardings``) pins
    the adapters' and optimizer state's output shardings to their input ones, so the step
    compiles once on a mesh."""
    sched = schedule(tc)

    def step(adapters, opt_state, base, batch, step_no, key):
        key = jax.random.fold_in(key, step_no)
        grads, total, count = _loss_and_grads(adapters, base, batch, key, c=c, lc=lc, rt=rt,
                                              chunk=tc.loss_chunk)
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        updates, opt_state = opt.update(grads, opt_state, adapters)
        adapters = optax.apply_updates(adapters, updates)
        metrics = {"loss": total / denom, "tokens": count, "grad_norm": optax.tree.norm(grads),
                   "lr": sched(step_no)}
        return adapters, opt_state, metrics

    if shardings is None:
        return jax.jit(step, donate_argnums=(0, 1))
    replicated = jax.sharding.NamedSharding(rt.mesh, jax.sharding.PartitionSpec())
    return jax.jit(step, donate_argnums=(0, 1), out_shardings=(*shardings, replicated))


def make_eval(c: GptOssConfig, lc: lora.LoraConfig, tc: TrainConfig, rt: M.Runtime):
    @jax.jit
    def evaluate(adapters, base, rows):
        return nll_sum(lora.inject(base, adapters, lc), rows, c, rt, tc.loss_chunk)
    return evaluate


def eval_loss(evaluate, adapters, base, data: PackedData, batch_size: int) -> float:
    """Mean target-token NLL over every row of ``data`` (padded to whole batches)."""
    rows = data.all_rows()
    n = len(rows["tokens"])
    total, count = 0.0, 0.0
    for lo in range(0, n, batch_size):
        part = {k: v[lo:lo + batch_size] for k, v in rows.items()}
        short = batch_size - len(part["tokens"])
        if short:
            pad = empty_rows(short, data.seq_len)
            part = {k: np.concatenate([part[k], pad[k]]) for k in ROW_FIELDS}
        s, m = evaluate(adapters, base, part)
        total, count = total + float(s), count + float(m)
    return total / max(count, 1.0)


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RunResult:
    adapters: dict
    history: list[dict]  # one entry per optimizer step run in this process
    eval_history: list[dict]
    start_step: int  # 0, or the step a resumed run continued from
    final_step: int


def _settings(c: GptOssConfig, lc: lora.LoraConfig, tc: TrainConfig) -> dict:
    return {"lora": dataclasses.asdict(lc), "train": dataclasses.asdict(tc),
            "model": dataclasses.asdict(c)}


def train(base: dict, c: GptOssConfig, lc: lora.LoraConfig, tc: TrainConfig, data: PackedData, *,
          output_dir: str | None = None, save_every: int = 0, resume: bool = False,
          eval_data: PackedData | None = None, eval_every: int = 0, stop_at: int | None = None,
          runtime: M.Runtime | None = None, progress: bool = False,
          place: Callable[[dict], dict] | None = None, log: Callable[[str], None] | None = None
          ) -> RunResult:
    """Train LoRA adapters on ``base`` (a frozen param tree) for ``tc.steps`` steps.

    ``output_dir``: checkpoints go to ``output_dir/checkpoints`` every ``save_every`` steps and
    at the end, and one JSON line per step to ``output_dir/train_log.jsonl``. ``resume``
    continues from the latest checkpoint there (the settings must match). ``stop_at`` ends the
    run after that step (as if killed right after its checkpoint), leaving the schedule as for
    ``tc.steps``. ``place`` puts a batch on devices (data-parallel sharding); default: as is.
    ``runtime``: default the ops resolved for this platform, blocks rematerialized.
    """
    rt = runtime or M.Runtime(ops=ops_runtime.resolve(), remat=True)
    opt = optimizer(tc)
    key = jax.random.PRNGKey(tc.seed)
    init_key, step_key = jax.random.split(key)
    adapters = lora.init(c, lc, init_key)
    opt_state = opt.init(adapters)
    start = 0
    ckpt = Checkpoints(os.path.join(output_dir, "checkpoints")) if output_dir else None
    settings = _settings(c, lc, tc)
    if resume:
        if ckpt is None:
            raise ValueError("resume needs an output directory")
        latest = ckpt.latest_step()
        if latest is not None:
            abstract = jax.eval_shape(lambda: {"adapters": adapters, "opt_state": opt_state,
                                               "step": jnp.int32(0), "key": step_key})
            state, meta = ckpt.restore(latest, abstract)
            if meta["settings"] != json.loads(json.dumps(settings)):
                raise ValueError(f"{ckpt.directory}: checkpoint {latest} was made with other "
                                 f"settings; resume with the same arguments or a new --output")
            adapters, opt_state, step_key = state["adapters"], state["opt_state"], state["key"]
            start = int(state["step"])
            data.restore(meta["data"])
            if log:
                log(f"resumed from step {start} ({ckpt.directory})")
    shardings = state_shardings(c, lc, opt, opt_state, rt.mesh)
    if shardings is not None:  # placed as the step returns them: it compiles once
        adapters, opt_state = jax.device_put((adapters, opt_state), shardings)
    step_fn = make_step(c, lc, tc, opt, rt, shardings)
    evaluate = make_eval(c, lc, tc, rt) if eval_data is not None else None
    place = place or (lambda b: b)
    history, eval_history = [], []
    log_file = open(os.path.join(output_dir, "train_log.jsonl"), "a") if output_dir else None
    end = tc.steps if stop_at is None else min(stop_at, tc.steps)

    def save(step):
        state = {"adapters": adapters, "opt_state": opt_state, "step": jnp.int32(step),
                 "key": step_key}
        ckpt.save(step, state, {"data": data.state(), "settings": settings})

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=tc.steps, initial=start, desc="finetune", unit="step", dynamic_ncols=True)
    try:
        for step in range(start, end):
            rows = data.take(tc.rows_per_step)
            batch = {k: v.reshape(tc.grad_accum, tc.batch_size, tc.seq_len) for k, v in rows.items()}
            t0 = time.perf_counter()
            adapters, opt_state, metrics = step_fn(adapters, opt_state, base, place(batch),
                                                   jnp.int32(step), step_key)
            metrics = {k: float(v) for k, v in metrics.items()}  # waits for the step
            dt = time.perf_counter() - t0
            entry = {"step": step + 1, **metrics, "seconds": dt,
                     "tokens_per_s": float(np.sum(rows["positions"] >= 0)) / dt}
            if not math.isfinite(entry["loss"]):
                raise FloatingPointError(f"loss became {entry['loss']} at step {step + 1}")
            history.append(entry)
            if evaluate is not None and eval_every and (step + 1) % eval_every == 0 and step + 1 < end:
                eval_history.append({"step": step + 1,
                                     "eval_loss": eval_loss(evaluate, adapters, base, eval_data,
                                                            tc.batch_size)})
                entry["eval_loss"] = eval_history[-1]["eval_loss"]
            if log_file:
                log_file.write(json.dumps(entry) + "\n")
                log_file.flush()
            if bar is not None:
                post = {"loss": f"{entry['loss']:.4f}", "lr": f"{entry['lr']:.2e}",
                        "tok/s": f"{entry['tokens_per_s']:.0f}"}
                if "eval_loss" in entry:
                    post["eval"] = f"{entry['eval_loss']:.4f}"
                bar.set_postfix(post)
                bar.update(1)
            if ckpt and save_every and (step + 1) % save_every == 0 and step + 1 != end:
                save(step + 1)
        if evaluate is not None:
            eval_history.append({"step": end, "eval_loss": eval_loss(evaluate, adapters, base,
                                                                     eval_data, tc.batch_size)})
            if log:
                log(f"eval loss at step {end}: {eval_history[-1]['eval_loss']:.4f}")
        if ckpt and end > start:
            save(end)
    finally:
        if bar is not None:
            bar.close()
        if log_file:
            log_file.close()
        if ckpt:
            ckpt.wait()
            ckpt.close()
    return RunResult(adapters, history, eval_history, start, end)
