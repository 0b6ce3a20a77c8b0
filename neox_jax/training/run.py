"""The fine-tuning run: data, state, the loop, Orbax checkpoints, signals, metrics and the loss plot.

    RUN_DIR/
      run.json          the settings that decide the run's numbers, the base checkpoint's identity and the
                        schedule's length (checked on --resume; written only once a resume's checks passed)
      checkpoints/N/    Orbax CheckpointManager, the last `keep` steps: train state (float32 trainable params,
                        optimizer state, loss scale, RNG, step) + meta (data position, epoch, loss)
      finetuned/        the trained parameters alone, a small checkpoint for `neox_jax.load(..., finetuned=RUN_DIR)`
                        and `neox-jax convert merge`
      metrics.jsonl     one line per step: step, epoch, loss, eval_loss (when evaluated), lr, grad_norm, loss_scale,
                        skipped, tokens_per_s
      loss.png          train and held-out loss against step (needs matplotlib: the `plot` extra)

SIGTERM / SIGINT finish the current step, save, write finetuned/ and return 128 + signal; `resume=True` continues from
the latest checkpoint with the same batches, optimizer state and loss scale, so its losses equal an uninterrupted run's.
A resume on another base checkpoint, or with another total step count (unless allow_schedule_change), is refused
before any file changes. A NaN/Inf loss raises NonFiniteLoss before anything from that step is saved.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from tqdm import tqdm

from neox_jax.errors import NeoXError
from neox_jax.model import lora
from neox_jax.parallel.sharding import batch_sharding, check_divisible, make_mesh
from neox_jax.store import checkpoint, records
from neox_jax.training import data, prefix, stacking
from neox_jax.training import step as finetune

LORA_FIELDS = ("lora_rank", "lora_alpha", "lora_targets", "lora_dropout", "rslora")
PREFIX_FIELDS = ("start_step", "data_step_items")
# settings a resumed run must share with the run it continues (the rest may change: steps, saving, mesh, ...)
EXACT = (
    "data",
    "tokenizer",
    "seq_len",
    "batch_size",
    "lr",
    "warmup_steps",
    "schedule",
    "min_lr_ratio",
    "weight_decay",
    "grad_clip",
    "dtype",
    "trainable",
    "heldout_fraction",
    "seed",
    "initial_loss_scale",
    "loss_scale_period",
    "remat",  # not the numbers but the state's layout: with remat the layers are stacked (training/stacking.py)
    *LORA_FIELDS,
    *PREFIX_FIELDS,
)


BEFORE = {"remat": "none"}  # what a run.json written before a setting existed meant by its absence


class NonFiniteLoss(RuntimeError):
    pass


@dataclasses.dataclass
class RunConfig:
    checkpoint: str
    data: list
    out: str
    tokenizer: str | None = None  # default: CHECKPOINT/tokenizer.json
    seq_len: int = 128
    batch_size: int = 8  # global, split over the mesh's `data` axis
    steps: int | None = None  # or epochs (default: 1 epoch)
    epochs: float | None = None
    lr: float = 3e-4
    warmup_steps: int = 0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    dtype: str | None = None  # default: as stored in the checkpoint
    mesh: str = "data=-1"
    trainable: str = "biases"  # or "all", "lora"
    lora_rank: int = 8  # --trainable lora: neox_jax/model/lora.py (PEFT's defaults)
    lora_alpha: float = 8.0
    lora_targets: str = ",".join(lora.DEFAULT_TARGETS)  # comma-separated
    lora_dropout: float = 0.0
    rslora: bool = False
    save_every: int = 100
    keep: int = 3
    eval_every: int = 0
    eval_fraction: float = 0.05
    eval_batches: int = 0  # 0: the whole held-out split
    start_step: int | None = None  # --data PREFIX: the Pythia step to start from (training/prefix.py)
    data_step_items: int = 1024  # --data PREFIX: sequences a step of the dataset's order (Pythia's 1024)
    seed: int = 0
    resume: bool = False
    initial_loss_scale: float = 2.0**15
    loss_scale_period: int = 2000
    transposed_copies: bool = True  # bfloat16 on CPU: transposed copies of the frozen kernels (finetune.py)
    remat: str = "none"  # activation checkpointing per block: none, dots, full (model.neox.REMAT)
    progress: bool = True
    stop_after: int | None = None  # test hook: SIGTERM ourselves after this step
    allow_schedule_change: bool = False  # resume with another total step count (reshapes the lr schedule)


def train_mode(cfg: RunConfig):
    """finetune's mode: "biases", "all", or the LoraSpec of --trainable lora."""
    if cfg.trainable != "lora":
        return cfg.trainable
    targets = tuple(t.strip() for t in cfg.lora_targets.split(",") if t.strip())
    return lora.LoraSpec(cfg.lora_rank, cfg.lora_alpha, targets, cfg.lora_dropout, cfg.rslora)


def _resolved(cfg: RunConfig, ckpt_dtype: str) -> dict:
    d = dataclasses.asdict(cfg)
    d["data"] = [str(Path(p).absolute()) for p in cfg.data]
    d["tokenizer"] = str(Path(cfg.tokenizer).absolute()) if cfg.tokenizer else None
    d["dtype"] = cfg.dtype or ckpt_dtype
    d["heldout_fraction"] = cfg.eval_fraction if cfg.eval_every else 0.0  # decides which windows train
    if cfg.trainable != "lora":  # not part of other runs (and absent from their run.json)
        d.update(dict.fromkeys(LORA_FIELDS))
    if not prefix.is_prefix(cfg.data):  # likewise for the dataset-prefix settings
        d.update(dict.fromkeys(PREFIX_FIELDS))
    return d


def _saved_run(out: Path, settings: dict, resume: bool) -> dict | None:
    """On resume, run.json as saved, after checking that the settings and the base checkpoint are the run's own.
    Writes nothing: run.json is rewritten only once every check of the resume has passed."""
    path = out / "run.json"
    if not (resume and path.is_file()):
        return None
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise NeoXError(f"{path}: not valid JSON ({e})") from None
    if saved.get("base") is not None and saved["base"] != settings["base"]:
        raise NeoXError(
            f"{path}: --resume with --checkpoint {settings['checkpoint']}, but the run started from "
            f"{saved.get('checkpoint')}, whose stored bytes differ ({saved['base'][:23]}... vs "
            f"{settings['base'][:23]}...); resume with the run's own base checkpoint"
        )
    saved = {**BEFORE, **saved}
    diff = [f"{k}: {saved.get(k)!r} -> {settings[k]!r}" for k in EXACT if saved.get(k) != settings[k]]
    if diff:
        raise NeoXError(f"{path}: --resume needs the settings the run started with; changed: {'; '.join(diff)}")
    return saved


def _check_schedule(saved: dict | None, total: int, allow: bool) -> None:
    before = (saved or {}).get("total_steps")
    if before is not None and before != total and not allow:
        raise NeoXError(
            f"--steps / --epochs: the run's learning-rate schedule spans {before} steps, this resume "
            f"asks for {total}, which reshapes it; pass --allow-schedule-change to continue with a "
            f"schedule over {total} steps"
        )


def _rewrite_metrics(path: Path, last_step: int) -> None:
    """Drops the lines for steps after last_step (all of them for a fresh run), and a torn last line."""
    if path.is_file():
        keep = [r for r in records.read_jsonl(path) if r["step"] <= last_step]
        records.write_text(path, "".join(json.dumps(r) + "\n" for r in keep))


def plot_losses(metrics_file: Path, out: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no loss.png (pip install 'neox-jax[plot]')")
        return None
    rows = records.read_jsonl(metrics_file)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train", lw=1)
    ev = [r for r in rows if "eval_loss" in r]
    if ev:
        ax.plot([r["step"] for r in ev], [r["eval_loss"] for r in ev], "o-", label="held-out")
    ax.set(xlabel="step", ylabel="cross entropy (nats / token)", title="fine-tuning loss")
    ax.legend()
    ax.grid(alpha=0.3)
    tmp = out.with_name(out.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(out)
    return out


class _Stop:
    """SIGTERM / SIGINT set a flag the loop reads after each step; a second SIGINT interrupts at once."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print(f"\n{signal.Signals(signum).name}: saving after this step, then stopping", flush=True)

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        return False


def run(cfg: RunConfig) -> int:
    """Runs (or resumes) a fine-tuning run; returns 0 when it finished, 128 + signal when a signal stopped it."""
    out = Path(cfg.out).absolute()
    base = checkpoint.open(cfg.checkpoint)
    settings = _resolved(cfg, base.dtype)
    settings["base"] = checkpoint.identity(cfg.checkpoint)  # resume refuses another base model
    dtype = checkpoint.DTYPES[settings["dtype"]]
    mgr, latest = _open_checkpoints(out, cfg)
    saved = _saved_run(out, settings, cfg.resume)

    model_cfg = base.cfg
    batches, heldout, what = prefix.run_data(cfg, model_cfg.vocab_size, settings["heldout_fraction"])
    total = cfg.steps if cfg.steps is not None else math.ceil((cfg.epochs or 1.0) * batches.batches_per_epoch)
    _check_schedule(saved, total, cfg.allow_schedule_change)
    mesh = make_mesh(cfg.mesh)
    check_divisible(model_cfg, mesh, cfg.batch_size)
    mode = train_mode(cfg)
    stacked = stacking.stacked_for(cfg.remat)
    model_cfg, trainable, frozen = finetune.load_for_training(
        cfg.checkpoint, mode, dtype, mesh, cfg.transposed_copies, cfg.seed, stacked
    )
    n_train = sum(x.size for x in jax.tree.leaves(trainable))
    print(
        f"data: {what}, {batches.batches_per_epoch} batches of {cfg.batch_size} per epoch; {total} steps on mesh "
        f"{dict(mesh.shape)}; training {n_train:,} of {model_cfg.num_params:,} parameters ({cfg.trainable}, "
        f"{settings['dtype']}"
        + (
            "; transposed copies of the frozen weights for the backward pass (--no-transposed-copies to save "
            "their memory)"
            if finetune.wants_backward_kernels(dtype, mesh, cfg.transposed_copies)
            else ""
        )
        + ")",
        flush=True,
    )

    tx = finetune.make_optimizer(
        finetune.make_schedule(cfg.lr, total, cfg.warmup_steps, cfg.schedule, cfg.min_lr_ratio),
        cfg.grad_clip,
        cfg.weight_decay,
    )
    dynamic = dtype == jnp.float16
    shardings = finetune.state_shardings(model_cfg, mesh, mode, tx, stacked)
    state = finetune.init_state(
        trainable, tx, shardings, dynamic=dynamic, initial_scale=cfg.initial_loss_scale, seed=cfg.seed
    )
    del trainable  # donated to the state
    pos = data.Position()
    metrics_file = out / "metrics.jsonl"
    if cfg.resume:
        abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
        restored = mgr.restore(
            latest, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        )
        state, pos = restored["state"], data.Position.from_dict(restored["meta"]["position"])
        print(f"resumed from {out / 'checkpoints' / str(latest)} (epoch {pos.epoch}, batch {pos.index})", flush=True)
    # every check has passed: only now may the run's record files change
    _rewrite_metrics(metrics_file, 0 if not cfg.resume else latest)  # lines past the checkpoint will be run again
    records.write_json(out / "run.json", {**settings, "total_steps": total})
    train_step = finetune.make_train_step(
        model_cfg,
        tx,
        dtype,
        mesh,
        mode,
        dynamic=dynamic,
        scale_period=cfg.loss_scale_period,
        transposed_copies=cfg.transposed_copies,
        remat=cfg.remat,
    )
    eval_step = (
        finetune.make_eval_step(model_cfg, dtype, mesh, mode, cfg.transposed_copies, stacked)
        if cfg.eval_every
        else None
    )

    def evaluate(params) -> float:
        total_loss, count = 0.0, 0.0
        for i, (w, wt) in enumerate(data.eval_batches(heldout, cfg.batch_size)):
            if cfg.eval_batches and i >= cfg.eval_batches:
                break
            s, n = eval_step(
                params, frozen, jax.device_put(w, batch_sharding(mesh)), jax.device_put(wt, batch_sharding(mesh, 1))
            )
            total_loss, count = total_loss + float(s), count + float(n)
        return total_loss / count

    def save(step: int, last: dict) -> None:
        if step not in mgr.all_steps():
            mgr.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    meta=ocp.args.JsonSave({"position": pos.to_dict(), "step": step, "loss": last.get("loss")}),
                ),
            )
            mgr.wait_until_finished()

    step = int(state["step"])
    last: dict = {}
    stopped = None
    bar = tqdm(total=total, initial=step, desc="finetune", unit="step", disable=not cfg.progress, dynamic_ncols=True)
    with _Stop() as stop, open(metrics_file, "a") as mf:
        while step < total:
            windows = batches.get(pos)
            t0 = time.perf_counter()
            new_state, m = train_step(state, frozen, jax.device_put(windows, batch_sharding(mesh)))
            m = {k: v.item() for k, v in jax.device_get(m).items()}
            dt = time.perf_counter() - t0
            if not math.isfinite(m["loss"]):
                good = mgr.latest_step()
                good = f"the last good checkpoint is step {good}" if good is not None else "no checkpoint was saved yet"
                raise NonFiniteLoss(
                    f"loss is {m['loss']} at step {step + 1} (epoch {pos.epoch}, batch {pos.index}): stopping without "
                    f"saving; {good} in {out / 'checkpoints'} (try a lower --lr, --dtype bfloat16/float32, or check "
                    f"the data)"
                )
            items = batches.items(pos) if isinstance(batches, prefix.PrefixBatches) else None
            state, step, epoch, pos = new_state, step + 1, pos.epoch, batches.advance(pos)
            last = _metrics_row(step, epoch, m, cfg.batch_size * cfg.seq_len / dt, items)
            if eval_step is not None and (step % cfg.eval_every == 0 or step == total):
                last["eval_loss"] = evaluate(state["params"])
            mf.write(json.dumps(last) + "\n")
            mf.flush()
            bar.update(1)
            bar.set_postfix(
                loss=f"{m['loss']:.4f}",
                tok_s=f"{last['tokens_per_s']:.0f}",
                **({"eval": f"{last['eval_loss']:.4f}"} if "eval_loss" in last else {}),
            )
            if cfg.stop_after is not None and step == cfg.stop_after:
                os.kill(os.getpid(), signal.SIGTERM)  # test hook: the real signal path
            stopped = stop.signum
            if step % cfg.save_every == 0 or step == total or stopped is not None:
                save(step, last)
            if stopped is not None:
                break
    bar.close()
    save(step, last)
    mgr.close()
    ft = finetune.save_finetuned(
        out,
        model_cfg,
        mode,
        state["params"],
        {"base_checkpoint": str(Path(cfg.checkpoint).absolute()), "step": step, "dtype": settings["dtype"]},
    )
    plot = plot_losses(metrics_file, out / "loss.png") if metrics_file.stat().st_size else None
    _report(out, step, total, stopped, last, ft, metrics_file, plot)
    return 128 + stopped if stopped else 0


def _open_checkpoints(out: Path, cfg: RunConfig):
    """The run's Orbax checkpoint manager and its latest step; refuses a run dir that has checkpoints without
    --resume, and --resume without any."""
    out.mkdir(parents=True, exist_ok=True)
    mgr = ocp.CheckpointManager(
        out / "checkpoints",
        options=ocp.CheckpointManagerOptions(max_to_keep=cfg.keep, create=True, enable_async_checkpointing=False),
    )
    latest = mgr.latest_step()
    if latest is not None and not cfg.resume:
        raise ValueError(
            f"{out} already holds checkpoints (up to step {latest}): pass --resume to continue that run, "
            f"or choose another --out"
        )
    if cfg.resume and latest is None:
        raise ValueError(f"--resume: {out / 'checkpoints'} holds no checkpoint to resume from")
    return mgr, latest


def _metrics_row(step: int, epoch: int, m: dict, tokens_per_s: float, items) -> dict:
    """One line of metrics.jsonl: the step's loss, lr, gradient norm, loss scale, throughput (and, on a Megatron
    dataset, the sequences it trained on)."""
    return {
        "step": step,
        "epoch": epoch,
        "loss": m["loss"],
        "lr": m["lr"],
        "grad_norm": m["grad_norm"],
        "loss_scale": m["loss_scale"],
        "skipped": bool(m["skipped"]),
        "tokens_per_s": tokens_per_s,
        **({"items": [items.start, items.stop]} if items else {}),
    }


def _report(out: Path, step: int, total: int, stopped, last: dict, ft, metrics_file: Path, plot) -> None:
    """The closing lines: how the run ended and where each of its outputs went."""
    what = f"stopped by {signal.Signals(stopped).name} at step {step}/{total}" if stopped else f"finished {step} steps"
    print(
        f"{what}; last loss {last.get('loss', float('nan')):.4f}\n  checkpoints: {out / 'checkpoints'} (latest "
        f"{step}{'; continue with --resume' if stopped else ''})\n  fine-tuned params: {ft}\n  metrics: "
        f"{metrics_file}" + (f"\n  plot: {plot}" if plot else ""),
        flush=True,
    )
