"""Joint training of ITN and STN with Adam; validation, checkpoints, TensorBoard.

Checkpoints: ``checkpoint.pt`` (the latest) is rewritten at the end of every epoch;
``checkpoint_epochNNNN.pt`` is kept at epoch 1, every ``val_interval`` epochs and at
the last epoch. Every write is atomic, so a killed run loses at most the epoch in
progress.

Stopping: while :func:`train` runs, SIGINT (Ctrl-C) and SIGTERM only set a flag.
At the end of the current batch ``checkpoint.pt`` is saved with the position inside
the epoch (its ``epoch`` is the last *completed* epoch, ``extra['batch']`` the
batches of the next epoch already done, with that epoch's partial loss sums) and
:class:`TrainingInterrupted` is raised (exit code 130 / 143). A second signal stops
at once (the previous checkpoint stays intact). The previous handlers are restored
when :func:`train` returns.

Resuming (``resume=True``) reloads weights, Adam state, RNG state and history and
continues at the saved position. Batches are shuffled with a generator seeded by
(seed, epoch), so on the same device a resumed run takes exactly the steps of an
uninterrupted one and ends with the same weights.

Restarts (config ``restarts``): after every epoch a probe of training pairs is checked
for a collapse (see :func:`collapse`); training then starts again from epoch 1 with the
weights and batch order of seed + 1000·k, exactly as a run with that ``--seed``. The
attempt is saved in checkpoints, so ``--resume`` continues the right one.

Several processes (``torchrun``, see :mod:`.distributed`): ``batch_size`` is the
*global* batch. Every process draws the same shuffled order, splits each batch into
``world`` nearly equal parts and takes its own; DistributedDataParallel averages the
gradients, and each process's loss is weighted by its share of the batch, so the
gradient is the mean over the whole batch, exactly as in one process. The learning
rate therefore stays as configured: N processes train the same model as one process
with the same config (up to floating-point round-off), N times faster at best. Only
rank 0 validates and writes logs, history and checkpoints; a stop request on any
process stops all of them at the same batch.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import layout, report
from ..config import Config
from ..data import PairSet
from ..errors import IstnError
from ..io import write_text
from ..losses import needs_seg, training_loss
from ..metrics import mean_metrics
from . import distributed
from .evaluate import evaluate
from .model import (
    Model,
    describe_mismatch,
    load_weights,
    read_checkpoint,
    save_checkpoint,
    scaling_from,
    write_model_info,
)

# Config keys that may change when resuming (they do not change what was learnt so far).
RESUMABLE_KEYS = ("epochs", "val_interval", "learning_rate", "refine", "refine_mode",
                  "refine_learning_rate", "refine_batch", "restarts")
# Training restart k (config 'restarts') draws its initialisation and batch order from
# seed + k * RESTART_SEED_STEP: it trains exactly as a run started with that --seed.
RESTART_SEED_STEP = 1000
# Training pairs on which a collapse is looked for after every epoch (see ``collapse``).
PROBE_PAIRS = 16
COLLAPSE_EPOCH = 10
# Relative spread of the pairs' parameters (``param_spread``) at or below which the STN
# counts as giving every pair the same transformation.
SAME_TRANSFORMATION = 1e-7


class TrainingInterrupted(IstnError):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint; ``exit_code`` 128+signal.

    ``str()`` is ``what`` followed by ``hint`` (how to continue with ``--resume``);
    commands without ``--resume`` print ``what`` alone.
    """

    def __init__(self, what: str, exit_code: int, hint: str = ""):
        super().__init__(what + hint)
        self.what = what
        self.exit_code = exit_code


class _StopRequest:
    """SIGINT/SIGTERM handlers that only record the request (installed in the main thread)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(sig) is not signal.SIG_IGN:  # respect nohup-like setups
                    self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:  # asked twice: stop now, keep the last checkpoint
            self._restore()
            raise KeyboardInterrupt
        self.signum = signum

    def _restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
        self._old = {}

    def __exit__(self, *exc) -> None:
        self._restore()


def _batch(ps: PairSet, idx: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor | None]:
    get = lambda t: t[idx].to(device, non_blocking=True) if t is not None else None  # noqa: E731
    return {k: get(getattr(ps, k)) for k in ("src", "trg", "src_seg", "trg_seg")}


class _Step(torch.nn.Module):
    """ITN + STN as one module returning the batch loss, for DistributedDataParallel."""

    def __init__(self, model: Model):
        super().__init__()
        self.model = model
        self.nets = torch.nn.ModuleList([n for n in (model.itn, model.stn) if n is not None])

    def forward(self, b: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return step_loss(self.model, b, self.model.cfg.smoothness)


class _NullWriter:
    """TensorBoard writer of the processes that do not write (rank > 0)."""

    def add_scalar(self, *args, **kwargs) -> None:
        pass

    def add_image(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def _local_part(idx: torch.Tensor, d: distributed.Dist) -> tuple[torch.Tensor, float]:
    """This process's pairs of a global batch and the weight of its mean loss.

    The weight ``len(local) * world / len(batch)`` makes DDP's gradient average the
    mean over the whole batch. A process left without pairs (a last batch smaller
    than the number of processes) runs one pair with weight 0, so that it still
    takes part in the gradient exchange.
    """
    if not d.active:
        return idx, 1.0
    local = idx.tensor_split(d.world)[d.rank]
    if len(local) == 0:
        return idx[:1], 0.0
    return local, len(local) * d.world / len(idx)


def step_loss(model: Model, b: dict, smoothness: float = 0.0
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward one batch and return the strategy's loss and its terms."""
    s_p, t_p = model.primes(b["src"], b["trg"])
    params = model.params(s_p, t_p)
    grid = model.stn.grid(params)
    loss, terms = training_loss(model.strategy, grid, b["src"], b["trg"], s_p, t_p,
                                b["src_seg"], b["trg_seg"])
    if smoothness > 0:
        terms["smoothness"] = model.stn.transform.smoothness(params)
        loss = loss + smoothness * terms["smoothness"]
    return loss, terms


@torch.no_grad()
def validation_loss(model: Model, ps: PairSet, device: torch.device, batch_size: int) -> float:
    model.train(False)
    total = 0.0
    for i in range(0, len(ps), batch_size):
        idx = torch.arange(i, min(i + batch_size, len(ps)))
        loss, _ = step_loss(model, _batch(ps, idx, device), model.cfg.smoothness)
        total += loss.item() * len(idx)
    return total / len(ps)


def train(model: Model, train_set: PairSet, val_set: PairSet | None, out: Path,
          device: torch.device, seed: int = 0, resume: bool = False, save_temp: bool = False,
          progress: bool = True) -> Path:
    """Train ``model`` for ``cfg.epochs`` epochs; returns the model folder.

    Validation (loss and metrics, no refinement) runs at epoch 1, every
    ``val_interval`` epochs and at the end. ``resume`` continues from
    ``out/train/model/checkpoint.pt`` when it exists (see the module docstring);
    a checkpoint from different data or options is refused with an IstnError.
    Raises :class:`TrainingInterrupted` on SIGINT/SIGTERM and IstnError when the loss
    or the weights become NaN/Inf (the last good checkpoint is kept).
    """
    cfg = model.cfg
    d = distributed.current()
    torch.set_flush_denormal(True)  # denormals slow CPU training without changing results
    if needs_seg(model.strategy) and train_set.src_seg is None:
        raise IstnError(f"strategy '{model.strategy}' needs training segmentations: "
                        "give --train_seg")
    n, bs = len(train_set), cfg.batch_size
    n_batches = math.ceil(n / bs)
    model_dir = layout.model_dir(out)
    model.to(device)
    step: torch.nn.Module = _Step(model)
    if d.active:  # broadcasts rank 0's weights, then averages gradients in backward()
        step = torch.nn.parallel.DistributedDataParallel(
            step, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate)
    start, history, position, attempt, restarts = 1, [], None, 0, []
    saved = "none"  # the last checkpoint written or loaded, for error messages
    if resume and layout.checkpoint(model_dir).is_file():
        start, history, position, attempt, restarts = _resume(model, opt, model_dir, seed, n,
                                                              n_batches)
        saved = (f"'{layout.checkpoint(model_dir)}' (epoch {start}, batch {position[0]})"
                 if position else f"'{layout.checkpoint(model_dir)}' (epoch {start - 1})")
    else:
        model.scaling = (scaling_from(train_set.src, train_set.trg, train_set.src_seg,
                                      train_set.trg_seg)
                         if cfg.network_scaling == "auto" else None)
    probe = _batch(train_set, torch.arange(min(n, PROBE_PAIRS)), device)
    if d.main:
        model_dir.mkdir(parents=True, exist_ok=True)
        write_model_info(model, model_dir)

    def save(path: Path, done: int, batch: int = 0, partial: dict | None = None) -> None:
        nonlocal saved
        if not d.main:
            return
        extra: dict[str, Any] = {"history": json.dumps(history), "seed": seed, "pairs": n,
                                 "attempt": attempt, "restarts": json.dumps(restarts)}
        if batch:
            extra.update(batch=batch, partial=partial)
        save_checkpoint(model, path, opt, done, extra)
        saved = (f"'{layout.checkpoint(model_dir)}' (epoch {done + 1}, batch {batch})" if batch
                 else f"'{layout.checkpoint(model_dir)}' (epoch {done})")

    writer = report.tensorboard_writer(layout.tensorboard_dir(out)) if d.main else _NullWriter()
    bar = tqdm(desc="train", disable=not (progress and d.main), initial=start - 1,
               total=cfg.epochs)
    try:
        with _StopRequest() as stop:
            epoch = start
            while epoch <= cfg.epochs:
                model.train(True)
                run_seed = seed + attempt * RESTART_SEED_STEP
                gen = torch.Generator().manual_seed(run_seed * 100_003 + epoch)
                order = torch.randperm(n, generator=gen)
                first, sums, count, before = 0, {}, 0, 0.0
                if position is not None and epoch == start:
                    first, sums, count, before = position
                t0 = time.perf_counter()
                stopping = False
                for b in range(first, n_batches):
                    idx, weight = _local_part(order[b * bs:(b + 1) * bs], d)
                    loss, terms = step(_batch(train_set, idx, device))
                    opt.zero_grad(set_to_none=True)
                    (loss * weight if weight != 1.0 else loss).backward()
                    # batch sums of every logged value (over all processes), the batch
                    # size and the stop request, in one exchange
                    named = {"loss": loss, **terms}
                    n_local = len(idx) * (weight > 0)
                    stats = torch.stack([v.detach().float() * n_local for v in named.values()]
                                        + [loss.new_tensor(n_local),
                                           loss.new_tensor(stop.signum is not None)])
                    stats = distributed.all_sum(stats, d)
                    if not torch.isfinite(stats[0]):
                        raise _diverged(f"the loss became {(stats[0] / stats[-2]).item()}",
                                        epoch, b + 1, n_batches, saved)
                    opt.step()
                    for k, v in zip(named, stats, strict=False):
                        sums[k] = sums.get(k, 0.0) + v
                    count += int(stats[-2])
                    stopping = bool(stats[-1] > 0)
                    if stopping and stop.signum is None:  # another process was asked
                        stop.signum = signal.SIGTERM
                    if stopping and b + 1 < n_batches:
                        _check_finite(model, epoch, b + 1, n_batches, saved)
                        save(layout.checkpoint(model_dir), epoch - 1, b + 1,
                             {"sums": {k: v.cpu() for k, v in sums.items()}, "count": count,
                              "seconds": before + time.perf_counter() - t0})
                        raise _interrupted(stop.signum, epoch, b + 1, n_batches, model_dir)
                _check_finite(model, epoch, n_batches, n_batches, saved)
                why = collapse(model, probe["src"], probe["trg"], epoch) \
                    if attempt < cfg.restarts else None
                if why:
                    attempt += 1
                    restarts.append({"epoch": epoch, "reason": why,
                                     "seed": seed + attempt * RESTART_SEED_STEP})
                    if d.main:
                        tqdm.write(f"istn: warning: epoch {epoch}: {why}; restart {attempt} of "
                                   f"{cfg.restarts} from a fresh initialisation (seed "
                                   f"{restarts[-1]['seed']})", file=sys.stderr)
                    reinitialise(model, restarts[-1]["seed"])
                    opt = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate)
                    if d.main:  # the failed attempt's kept checkpoints
                        for old in model_dir.glob(layout.EPOCH_CHECKPOINTS):
                            old.unlink(missing_ok=True)
                    history, epoch, position = [], 1, None
                    bar.reset()
                    continue
                row = {"epoch": epoch, "seed": run_seed,
                       "seconds": before + time.perf_counter() - t0}
                row.update({f"train_{k}": float(v) / count for k, v in sums.items()})
                for k, v in row.items():
                    if k.startswith("train_"):
                        writer.add_scalar(f"train/{k[6:]}", v, epoch)
                writer.add_scalar("train/seconds_per_epoch", row["seconds"], epoch)
                bar.set_postfix(loss=f"{row['train_loss']:.4g}")
                keep = epoch == 1 or epoch % cfg.val_interval == 0 or epoch == cfg.epochs
                if keep and d.main and val_set is not None and len(val_set):
                    # before COLLAPSE_EPOCH a slow start looks like a collapse; a real one
                    # restarts training on its own while restarts remain
                    warn = attempt >= cfg.restarts or epoch >= COLLAPSE_EPOCH
                    row.update(_validate(model, val_set, device, writer, epoch, out, save_temp,
                                         warn))
                    model.train(True)
                history.append(row)
                if keep:
                    save(layout.epoch_checkpoint(model_dir, epoch), epoch)
                save(layout.checkpoint(model_dir), epoch)
                if d.main:
                    write_text(json.dumps(history, indent=1) + "\n", layout.history(out))
                # several processes stop together, at a batch exchange (above)
                asked = stopping if d.active else stop.signum is not None
                if asked and epoch < cfg.epochs:
                    raise _interrupted(stop.signum, epoch + 1, 0, n_batches, model_dir)
                bar.update()
                epoch += 1
    finally:
        bar.close()
        writer.close()
        torch.set_flush_denormal(False)  # leave the process as found (the default is off)
    if d.main:
        write_text(json.dumps(history, indent=1) + "\n", layout.history(out))
        report.loss_curve(history, layout.loss_curve(out))
    distributed.barrier(d)  # the model is written before any process goes on to test it
    if stop.signum is not None:  # the request came during the last epoch: training is done
        raise TrainingInterrupted(
            f"stopped by {signal.Signals(stop.signum).name} after training all {cfg.epochs} "
            f"epochs; the model is in '{model_dir}'", 128 + stop.signum)
    return model_dir


def _resume(model: Model, opt: torch.optim.Optimizer, model_dir: Path, seed: int, n: int,
            n_batches: int) -> tuple[int, list, tuple | None, int, list]:
    """Load ``checkpoint.pt`` for resuming.

    Returns (first epoch, history, position, restart attempt, restart records).
    """
    path = layout.checkpoint(model_dir)
    state = read_checkpoint(path)
    extra = state["extra"]
    fixed = tuple(k for k in Config.__dataclass_fields__ if k not in RESUMABLE_KEYS)
    diffs = describe_mismatch(state["meta"], model.strategy, model.transformation, model.cfg,
                              keys=fixed)
    if extra.get("seed", seed) != seed:
        diffs.append(f"--seed {extra['seed']} (asked: {seed})")
    if extra.get("pairs", n) != n:
        diffs.append(f"{extra['pairs']} training pairs (given: {n})")
    if diffs:
        raise IstnError(f"--resume: checkpoint '{path}' was trained with {'; '.join(diffs)}; "
                        "resume with the same data, seed and options (only epochs, "
                        "val_interval, learning_rate, restarts and refine settings may change) "
                        "or start a new --out")
    try:
        load_weights(model, state, str(path))
        opt.load_state_dict(state["optimizer"])
        for group in opt.param_groups:
            group["lr"] = model.cfg.learning_rate
        torch.set_rng_state(state["rng"])
        history = json.loads(extra.get("history", "[]"))
        attempt = int(extra.get("attempt", 0))
        restarts = json.loads(extra.get("restarts", "[]"))
        position = None
        batch = extra.get("batch", 0)
        if batch:
            partial = extra["partial"]
            if not 0 < batch < n_batches:
                raise ValueError(f"batch {batch} outside 1..{n_batches - 1}")
            position = (int(batch), dict(partial["sums"]), int(partial["count"]),
                        float(partial["seconds"]))
    except IstnError:
        raise
    except Exception as e:  # damaged or hand-edited checkpoint
        raise IstnError(f"--resume: checkpoint '{path}' cannot be resumed from "
                        f"({type(e).__name__}: {_first_line(e)}); "
                        "start a new --out or use --overwrite") from None
    for stale in model_dir.glob(layout.TEMP_CHECKPOINTS):  # temporary files of a killed run
        stale.unlink(missing_ok=True)
    return int(state["epoch"]) + 1, history, position, attempt, restarts


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:160] if text else ""


def _check_finite(model: Model, epoch: int, batch: int, n_batches: int, saved: str) -> None:
    if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        raise _diverged("the weights became NaN or Inf", epoch, batch, n_batches, saved)


def _diverged(what: str, epoch: int, batch: int, n_batches: int, saved: str) -> IstnError:
    keep = (f"the last good checkpoint {saved} is kept; lower learning_rate or normalise "
            "the images, then continue with --resume --learning_rate SMALLER"
            if saved != "none" else
            "no checkpoint was written; lower learning_rate or normalise the images")
    return IstnError(f"training diverged at epoch {epoch}, batch {batch} of {n_batches}: "
                     f"{what}; {keep}")


def _interrupted(signum: int, epoch: int, batch: int, n_batches: int,
                 model_dir: Path) -> TrainingInterrupted:
    where = (f"epoch {epoch}, batch {batch} of {n_batches}" if batch
             else f"the end of epoch {epoch - 1}")
    return TrainingInterrupted(
        f"training stopped by {signal.Signals(signum).name} at {where}; checkpoint saved in "
        f"'{layout.checkpoint(model_dir)}'", 128 + signum,
        "; to continue, run the same command with --resume (without --overwrite)")


def param_spread(params: torch.Tensor) -> float:
    """Largest difference between pairs' parameters, relative to 1 + their size (inf: one pair).

    About 1e-9 when the STN has collapsed to one transformation for all pairs (only
    round-off differs); 1e-6 and more in trainings that went on to learn.
    """
    if len(params) < 2:
        return 0.0 if len(params) == 0 else float("inf")
    flat = params.flatten(1).double()
    return float((flat - flat[0]).abs().max() / (1 + flat.abs().max()))


@torch.no_grad()
def dead_layers(model: Model, src: torch.Tensor, trg: torch.Tensor) -> list[str]:
    """ReLU layers of the ITN and STN whose output is zero for every voxel of every pair.

    Such a layer passes no gradient any more, so training cannot revive it: a dead ITN
    layer on its decoder path makes S' the same for every image, a dead STN layer makes
    the STN predict one transformation for every pair. Both happen with the published
    networks in some trainings (their narrowest layers have two and eight channels).
    Names are 'itn.<conv>' (the convolution before the ReLU) or 'stn.<ReLU module>'.
    """
    return _probe(model, src, trg)[0]


@torch.no_grad()
def _probe(model: Model, src: torch.Tensor, trg: torch.Tensor
           ) -> tuple[list[str], torch.Tensor]:
    """(dead ReLU layers, predicted parameters) of the pairs, in one forward pass."""
    alive: dict[str, bool] = {}

    def hook(name):
        return lambda module, args, out: alive.__setitem__(
            name, alive.get(name, False) or bool((out > 0).any()))

    watched = ([(f"itn.{name}", getattr(model.itn, name)) for name in model.itn.RELU_LAYERS]
               if model.itn is not None else [])
    watched += [(f"stn.{name}", m) for name, m in model.stn.named_modules()
                if isinstance(m, torch.nn.ReLU)]
    hooks = [m.register_forward_hook(hook(name)) for name, m in watched]
    was_training = model.stn.training
    model.train(False)
    params = []
    try:
        for i in range(0, len(src), 16):
            params.append(model.params(*model.primes(src[i:i + 16], trg[i:i + 16])))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return [name for name, _ in watched if not alive.get(name, False)], torch.cat(params)


def collapse(model: Model, src: torch.Tensor, trg: torch.Tensor, epoch: int) -> str | None:
    """Why training of ``model`` cannot succeed any more, judged on training pairs, or None.

    Two states seen with the published networks: a dead ReLU layer (it passes no
    gradient, so training cannot revive it), and, from epoch ``COLLAPSE_EPOCH`` on, an
    STN that still gives every pair the same transformation (relative spread <= 1e-7;
    such runs learnt late and ended far worse, while runs that trained well had spreads
    of 1e-3 and more by epoch 10). No labels are used.
    """
    dead, params = _probe(model, src, trg)
    if dead:
        return (f"layer(s) {', '.join(dead)} output zero for all {len(src)} probed training "
                "pairs (dead ReLUs)")
    if epoch >= COLLAPSE_EPOCH and len(src) > 1:
        spread = param_spread(params)
        if spread <= SAME_TRANSFORMATION:
            return (f"the STN gives all {len(src)} probed training pairs the same "
                    f"transformation (relative spread {spread:.1g})")
    return None


def reinitialise(model: Model, seed: int) -> None:
    """Fresh weights for ``model``: those of a model built after ``torch.manual_seed(seed)``.

    The weights are copied into the existing parameters, so optimisers must be rebuilt
    but wrappers (DistributedDataParallel) keep working; every process draws the same.
    """
    torch.manual_seed(seed)
    fresh = Model.build(model.cfg, model.strategy, model.transformation)
    with torch.no_grad():
        for net, new in ((model.itn, fresh.itn), (model.stn, fresh.stn)):
            if net is not None:
                for p, q in zip(net.parameters(), new.parameters(), strict=True):
                    p.copy_(q)


def _validate(model: Model, val_set: PairSet, device, writer, epoch: int, out: Path,
              save_temp: bool, warn: bool = True) -> dict[str, float]:
    row = {"val_loss": validation_loss(model, val_set, device, model.cfg.batch_size)}
    res = evaluate(model, val_set, device, refine_iters=0, progress=False)
    dead = dead_layers(model, val_set.src.to(device), val_set.trg.to(device))
    spread = param_spread(res["warped"].params)
    collapsed = bool(dead) or spread <= SAME_TRANSFORMATION
    if collapsed:
        row["val_stn_collapsed"] = 1.0
    if warn and collapsed:
        why = (f"layer(s) {', '.join(dead)} output zero for every pair (dead ReLUs)" if dead
               else f"its outputs differ by at most {spread:.1g} between pairs")
        tqdm.write(f"istn: warning: epoch {epoch}: the STN gives all {len(val_set)} validation "
                   f"pairs the same transformation: {why}; trainings in this state did not "
                   "recover or learnt late in our runs: retrain with another --seed (or allow "
                   "'restarts')", file=sys.stderr)
    for k, v in mean_metrics(res["before_refinement"]).items():
        if v is not None:
            row[f"val_{k}"] = v
    for k, v in row.items():
        writer.add_scalar(f"val/{k[4:]}", v, epoch)
    panel = report.panel_tensor(val_set, res, 0)
    writer.add_image("val/pair0", panel, epoch, dataformats="HW")
    if save_temp:
        report.pair_grid(val_set, res, layout.val_picture(out, epoch))
    return row
