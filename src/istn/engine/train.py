"""Joint training of ITN and STN with Adam; validation, checkpoints, TensorBoard.

The loop is small steps over a :class:`TrainState` (epoch, history, position inside an
epoch, restart attempt, last checkpoint): :func:`run_epoch` runs the batches of one
epoch, :func:`after_epoch` checks health, restarts, validates and saves.

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
for a collapse (see :func:`.health.collapse`); training then starts again from epoch 1 with the
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

import hashlib
import json
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import layout, report
from ..config import Config
from ..data import PairSet
from ..errors import IstnError, count
from ..io import write_text
from ..losses import needs_seg
from ..metrics import mean_metrics
from . import distributed, health
from .checkpoint import (
    describe_mismatch,
    load_weights,
    read_checkpoint,
    save_checkpoint,
    write_model_info,
)
from .evaluate import evaluate
from .health import COLLAPSE_EPOCH, collapse, dead_layers, param_spread  # noqa: F401
from .model import Model, scaling_from

# Config keys that may change when resuming (they do not change what was learnt so far).
RESUMABLE_KEYS = ("epochs", "val_interval", "learning_rate", "refine", "refine_mode",
                  "refine_learning_rate", "refine_batch", "refine_inputs", "refine_similarity",
                  "refine_tolerance", "refine_samples", "refine_levels", "refine_resolution",
                  "refine_stages", "restarts")
# Training restart k (config 'restarts') draws its initialisation and batch order from
# seed + k * RESTART_SEED_STEP: it trains exactly as a run started with that --seed.
RESTART_SEED_STEP = 1000
# Training pairs on which a collapse is looked for after every epoch (see ``collapse``).
PROBE_PAIRS = 16


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




@dataclass
class Position:
    """Where an interrupted epoch stopped: batches done and that epoch's partial sums."""

    batch: int
    sums: dict[str, torch.Tensor]
    count: int
    seconds: float


@dataclass
class TrainState:
    """Everything a training carries from one epoch to the next (and into checkpoints)."""

    epoch: int = 1  # the epoch to run next
    history: list[dict[str, Any]] = field(default_factory=list)
    position: Position | None = None  # inside ``epoch``, after an interrupted run
    attempt: int = 0  # restarts so far (config 'restarts')
    restarts: list[dict[str, Any]] = field(default_factory=list)
    saved: str = "none"  # the last checkpoint written or loaded, for error messages


@dataclass
class _Run:
    """What the steps of one training share (fixed, but the optimiser after a restart)."""

    model: Model
    step: torch.nn.Module  # the model, or its DistributedDataParallel wrapper
    opt: torch.optim.Optimizer
    train_set: PairSet
    val_set: PairSet | None
    out: Path
    device: torch.device
    seed: int
    save_temp: bool
    d: distributed.Dist
    probe: dict[str, torch.Tensor | None]
    writer: Any = None
    bar: Any = None
    stop: Any = None

    @property
    def model_dir(self) -> Path:
        return layout.model_dir(self.out)

    @property
    def n_batches(self) -> int:
        return math.ceil(len(self.train_set) / self.model.cfg.batch_size)

    @cached_property
    def pool(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The distinct training images (and their SoI) of random pairing: [M, 1, *shape].

        An image listed as a source of one pair and a target of another counts once.
        """
        ps = self.train_set
        images = torch.cat([ps.src, ps.trg])
        segs = torch.cat([ps.src_seg, ps.trg_seg]) if ps.src_seg is not None else None
        seen: dict[bytes, int] = {}
        keep = [seen.setdefault(hashlib.sha256(img.numpy().tobytes()).digest(), i)
                for i, img in enumerate(images)]
        idx = torch.tensor(sorted(set(keep)))
        return images[idx], segs[idx] if segs is not None else None

    @cached_property
    def data_sha(self) -> str:
        """sha256 of the training tensors: --resume refuses other data of the same size."""
        h = hashlib.sha256()
        for key in ("src", "trg", "src_seg", "trg_seg"):
            t = getattr(self.train_set, key)
            h.update(key.encode() + (t.contiguous().numpy().tobytes() if t is not None else b""))
        return h.hexdigest()


@dataclass
class EpochResult:
    """Loss sums over an epoch's pairs, their count, seconds and the stop request."""

    sums: dict[str, torch.Tensor]
    count: int
    seconds: float
    stopping: bool


def _batch(ps: PairSet, idx: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor | None]:
    get = lambda t: t[idx].to(device, non_blocking=True) if t is not None else None  # noqa: E731
    return {k: get(getattr(ps, k)) for k in ("src", "trg", "src_seg", "trg_seg")}


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


def step_loss(step: torch.nn.Module, b: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward one batch through a Model (or its DDP wrapper): the loss and its terms."""
    return step(b)


def backward_step(step: torch.nn.Module, opt: torch.optim.Optimizer, b: dict,
                  weight: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward and backward of one batch (loss times ``weight``); ``opt.step()`` is the caller's.

    The caller checks the loss (and exchanges it between processes) before stepping,
    so a diverged batch never reaches the weights.
    """
    loss, terms = step_loss(step, b)
    opt.zero_grad(set_to_none=True)
    (loss * weight if weight != 1.0 else loss).backward()
    return loss, terms


def epoch_order(n: int, run_seed: int, epoch: int) -> torch.Tensor:
    """The shuffled pair order of ``epoch``: a function of (seed, epoch) only, for resuming."""
    gen = torch.Generator().manual_seed(run_seed * 100_003 + epoch)
    return torch.randperm(n, generator=gen)


def random_pairs(m: int, n: int, run_seed: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` (source, target) index pairs into ``m`` images for ``epoch``, never an image
    with itself; a function of (seed, epoch) only, as ``epoch_order``."""
    gen = torch.Generator().manual_seed(run_seed * 100_003 + epoch + 7_919)
    a = torch.randint(m, (n,), generator=gen)
    b = (a + torch.randint(1, max(m, 2), (n,), generator=gen)) % m
    return a, b


def _pool_batch(pool: tuple[torch.Tensor, torch.Tensor | None], a: torch.Tensor,
                b: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor | None]:
    """A batch of random pairs: sources ``pool[a]``, targets ``pool[b]``."""
    images, segs = pool
    def get(t, i):
        return t[i].to(device, non_blocking=True) if t is not None else None
    return {"src": get(images, a), "trg": get(images, b), "src_seg": get(segs, a),
            "trg_seg": get(segs, b)}


@torch.no_grad()
def validation_loss(model: Model, ps: PairSet, device: torch.device, batch_size: int) -> float:
    model.train(False)
    total = 0.0
    for i in range(0, len(ps), batch_size):
        idx = torch.arange(i, min(i + batch_size, len(ps)))
        loss, _ = model(_batch(ps, idx, device))
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
    if needs_seg(model.strategy) and train_set.src_seg is None:
        raise IstnError(f"strategy '{model.strategy}' needs training segmentations: "
                        "give --train_seg")
    torch.set_flush_denormal(True)  # denormals slow CPU training without changing results
    try:
        run, state = _setup(model, train_set, val_set, out, device, seed, resume, save_temp)
        _loop(run, state, progress)
    finally:
        torch.set_flush_denormal(False)  # leave the process as found (the default is off)
    if run.d.main:
        _write_history(run, state)
        report.loss_curve(state.history, layout.loss_curve(out))
    distributed.barrier(run.d)  # the model is written before any process goes on to test it
    if run.stop.signum is not None:  # the request came during the last epoch: training is done
        raise TrainingInterrupted(
            f"stopped by {signal.Signals(run.stop.signum).name} after training all "
            f"{count(model.cfg.epochs, 'epoch')}; the model is in '{run.model_dir}'",
            128 + run.stop.signum)
    return run.model_dir


def _setup(model: Model, train_set: PairSet, val_set: PairSet | None, out: Path,
           device: torch.device, seed: int, resume: bool, save_temp: bool
           ) -> tuple[_Run, TrainState]:
    """The shared objects of a training, and its state (fresh or resumed)."""
    d = distributed.current()
    model.to(device)
    step: torch.nn.Module = model
    if d.active:  # broadcasts rank 0's weights, then averages gradients in backward()
        # buffers (grids, bases, network scaling) are computed alike on every process
        step = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False)
    opt = torch.optim.Adam(model.parameters(), lr=model.cfg.learning_rate)
    probe = _batch(train_set, torch.arange(min(len(train_set), PROBE_PAIRS)), device)
    run = _Run(model, step, opt, train_set, val_set, out, device, seed, save_temp, d, probe)
    if resume and layout.checkpoint(run.model_dir).is_file():
        state = _resume(run)
    else:
        state = TrainState()
        model.scaling = (scaling_from(train_set.src, train_set.trg, train_set.src_seg,
                                      train_set.trg_seg)
                         if model.cfg.network_scaling == "auto" else None)
    if d.main:
        run.model_dir.mkdir(parents=True, exist_ok=True)
        write_model_info(model, run.model_dir)
    return run, state


def _loop(run: _Run, state: TrainState, progress: bool) -> None:
    """Epochs until the last one, with the stop request installed and the logs open."""
    cfg = run.model.cfg
    run.writer = (report.tensorboard_writer(layout.tensorboard_dir(run.out)) if run.d.main
                  else _NullWriter())
    run.bar = tqdm(desc="train", disable=not (progress and run.d.main),
                   initial=state.epoch - 1, total=cfg.epochs)
    try:
        with _StopRequest() as stop:
            run.stop = stop
            while state.epoch <= cfg.epochs:
                after_epoch(run, state, run_epoch(run, state))
    finally:
        run.bar.close()
        run.writer.close()


def run_epoch(run: _Run, state: TrainState) -> EpochResult:
    """The batches of ``state.epoch`` (from ``state.position`` after an interruption).

    Every process takes its share of each global batch; the logged sums, batch size
    and stop request are exchanged in one all-reduce per batch. On a stop request the
    position is saved and :class:`TrainingInterrupted` raised.
    """
    model, d, bs, n_batches = run.model, run.d, run.model.cfg.batch_size, run.n_batches
    model.train(True)
    run_seed = run.seed + state.attempt * RESTART_SEED_STEP
    order = epoch_order(len(run.train_set), run_seed, state.epoch)
    pairs = (random_pairs(len(run.pool[0]), len(run.train_set), run_seed, state.epoch)
             if model.cfg.train_pairing == "random" else None)
    pos = state.position or Position(0, {}, 0, 0.0)
    sums, count, t0, stopping = dict(pos.sums), pos.count, time.perf_counter(), False
    for b in range(pos.batch, n_batches):
        idx, weight = _local_part(order[b * bs:(b + 1) * bs], d)
        batch = (_batch(run.train_set, idx, run.device) if pairs is None
                 else _pool_batch(run.pool, pairs[0][idx], pairs[1][idx], run.device))
        loss, terms = backward_step(run.step, run.opt, batch, weight)
        named = {"loss": loss, **terms}
        n_local = len(idx) * (weight > 0)
        stats = torch.stack([v.detach().float() * n_local for v in named.values()]
                            + [loss.new_tensor(n_local),
                               loss.new_tensor(run.stop.signum is not None)])
        stats = distributed.all_sum(stats, d)
        if not torch.isfinite(stats[0]):
            raise _diverged(f"the loss became {(stats[0] / stats[-2]).item()}",
                            state.epoch, b + 1, n_batches, state.saved)
        run.opt.step()
        for k, v in zip(named, stats, strict=False):
            sums[k] = sums.get(k, 0.0) + v
        count += int(stats[-2])
        stopping = bool(stats[-1] > 0)
        if stopping and run.stop.signum is None:  # another process was asked
            run.stop.signum = signal.SIGTERM
        if stopping and b + 1 < n_batches:
            _check_finite(model, state.epoch, b + 1, n_batches, state.saved)
            seconds = pos.seconds + time.perf_counter() - t0
            _save(run, state, layout.checkpoint(run.model_dir), state.epoch - 1,
                  Position(b + 1, {k: v.cpu() for k, v in sums.items()}, count, seconds))
            raise _interrupted(run.stop.signum, state.epoch, b + 1, n_batches, run.model_dir)
    return EpochResult(sums, count, pos.seconds + time.perf_counter() - t0, stopping)


def after_epoch(run: _Run, state: TrainState, res: EpochResult) -> None:
    """Health check (restart), history, validation, checkpoints; then the next epoch."""
    cfg, epoch = run.model.cfg, state.epoch
    _check_finite(run.model, epoch, run.n_batches, run.n_batches, state.saved)
    why = (collapse(run.model, run.probe["src"], run.probe["trg"], epoch)
           if state.attempt < cfg.restarts else None)
    if why:
        _restart(run, state, why)
        return
    row = {"epoch": epoch, "seed": run.seed + state.attempt * RESTART_SEED_STEP,
           "seconds": res.seconds}
    row.update({f"train_{k}": float(v) / res.count for k, v in res.sums.items()})
    for k, v in row.items():
        if k.startswith("train_"):
            run.writer.add_scalar(f"train/{k[6:]}", v, epoch)
    run.writer.add_scalar("train/seconds_per_epoch", row["seconds"], epoch)
    run.bar.set_postfix(loss=f"{row['train_loss']:.4g}")
    keep = epoch == 1 or epoch % cfg.val_interval == 0 or epoch == cfg.epochs
    if keep and run.d.main and run.val_set is not None and len(run.val_set):
        # before COLLAPSE_EPOCH a slow start looks like a collapse; a real one restarts
        # training on its own while restarts remain
        row.update(_validate(run, epoch, state.attempt >= cfg.restarts or
                             epoch >= COLLAPSE_EPOCH))
        run.model.train(True)
    state.history.append(row)
    state.position = None
    if keep:
        _save(run, state, layout.epoch_checkpoint(run.model_dir, epoch), epoch)
    _save(run, state, layout.checkpoint(run.model_dir), epoch)
    if run.d.main:
        _write_history(run, state)
    # several processes stop together, at a batch exchange (run_epoch)
    asked = res.stopping if run.d.active else run.stop.signum is not None
    if asked and epoch < cfg.epochs:
        raise _interrupted(run.stop.signum, epoch + 1, 0, run.n_batches, run.model_dir)
    run.bar.update()
    state.epoch += 1


def _restart(run: _Run, state: TrainState, why: str) -> None:
    """Start again from epoch 1 with the initialisation and batch order of the next seed."""
    cfg = run.model.cfg
    state.attempt += 1
    state.restarts.append({"epoch": state.epoch, "reason": why,
                           "seed": run.seed + state.attempt * RESTART_SEED_STEP})
    if run.d.main:
        tqdm.write(f"istn: warning: epoch {state.epoch}: {why}; restart {state.attempt} of "
                   f"{cfg.restarts} from a fresh initialisation (seed "
                   f"{state.restarts[-1]['seed']})", file=sys.stderr)
    reinitialise(run.model, state.restarts[-1]["seed"])
    run.opt = torch.optim.Adam(run.model.parameters(), lr=cfg.learning_rate)
    if run.d.main:  # the failed attempt's kept checkpoints
        for old in run.model_dir.glob(layout.EPOCH_CHECKPOINTS):
            old.unlink(missing_ok=True)
    state.history, state.epoch, state.position = [], 1, None
    run.bar.reset()


def _save(run: _Run, state: TrainState, path: Path, done: int,
          position: Position | None = None) -> None:
    """Checkpoint after ``done`` completed epochs (and ``position`` batches into the next)."""
    if not run.d.main:
        return
    extra: dict[str, Any] = {"history": json.dumps(state.history), "seed": run.seed,
                             "pairs": len(run.train_set), "data_sha256": run.data_sha,
                             "attempt": state.attempt,
                             "restarts": json.dumps(state.restarts)}
    if position is not None:
        extra.update(batch=position.batch, partial={"sums": position.sums,
                                                    "count": position.count,
                                                    "seconds": position.seconds})
    save_checkpoint(run.model, path, run.opt, done, extra)
    ckpt = layout.checkpoint(run.model_dir)
    state.saved = (f"'{ckpt}' (epoch {done + 1}, batch {position.batch})" if position
                   else f"'{ckpt}' (epoch {done})")


def _write_history(run: _Run, state: TrainState) -> None:
    write_text(json.dumps(state.history, indent=1) + "\n", layout.history(run.out))


def _resume(run: _Run) -> TrainState:
    """The state saved in ``checkpoint.pt``, after checking it fits this training."""
    path = layout.checkpoint(run.model_dir)
    model = run.model
    state = read_checkpoint(path)
    extra = state["extra"]
    fixed = tuple(k for k in Config.__dataclass_fields__ if k not in RESUMABLE_KEYS)
    diffs = describe_mismatch(state["meta"], model.strategy, model.transformation, model.cfg,
                              keys=fixed)
    if extra.get("seed", run.seed) != run.seed:
        diffs.append(f"--seed {extra['seed']} (asked: {run.seed})")
    if extra.get("pairs", len(run.train_set)) != len(run.train_set):
        diffs.append(f"{count(extra['pairs'], 'training pair')} (given: {len(run.train_set)})")
    elif extra.get("data_sha256", run.data_sha) != run.data_sha:  # absent in older checkpoints
        diffs.append("other training data (the images or segmentations differ)")
    if diffs:
        raise IstnError(f"--resume: checkpoint '{path}' was trained with {'; '.join(diffs)}; "
                        "resume with the same data, seed and options (only epochs, "
                        "val_interval, learning_rate, restarts and refine settings may change) "
                        "or start a new --out")
    try:
        ts = _restore(run, state)
    except IstnError:
        raise
    except Exception as e:  # damaged or hand-edited checkpoint
        raise IstnError(f"--resume: checkpoint '{path}' cannot be resumed from "
                        f"({type(e).__name__}: {_first_line(e)}); "
                        "start a new --out or use --overwrite") from None
    for stale in run.model_dir.glob(layout.TEMP_CHECKPOINTS):  # temporary files of a killed run
        stale.unlink(missing_ok=True)
    return ts


def _restore(run: _Run, state: dict[str, Any]) -> TrainState:
    """Weights, Adam and RNG state into the run; the TrainState of the checkpoint."""
    path = layout.checkpoint(run.model_dir)
    load_weights(run.model, state, str(path))
    run.opt.load_state_dict(state["optimizer"])
    for group in run.opt.param_groups:
        group["lr"] = run.model.cfg.learning_rate
    torch.set_rng_state(state["rng"])
    extra = state["extra"]
    ts = TrainState(epoch=int(state["epoch"]) + 1,
                    history=json.loads(extra.get("history", "[]")),
                    attempt=int(extra.get("attempt", 0)),
                    restarts=json.loads(extra.get("restarts", "[]")))
    batch = extra.get("batch", 0)
    if batch:
        partial = extra["partial"]
        if not 0 < batch < run.n_batches:
            raise ValueError(f"batch {batch} outside 1..{run.n_batches - 1}")
        ts.position = Position(int(batch), dict(partial["sums"]), int(partial["count"]),
                               float(partial["seconds"]))
    ts.saved = (f"'{path}' (epoch {ts.epoch}, batch {batch})" if batch
                else f"'{path}' (epoch {ts.epoch - 1})")
    return ts


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


def reinitialise(model: Model, seed: int) -> None:
    """Fresh weights for ``model``: those of a model built after ``torch.manual_seed(seed)``.

    The weights are copied into the existing parameters, so optimisers must be rebuilt
    but wrappers (DistributedDataParallel) keep working; every process draws the same.
    """
    torch.manual_seed(seed)
    fresh = Model(model.cfg, model.strategy, model.transformation)
    with torch.no_grad():
        for net, new in ((model.itn, fresh.itn), (model.stn, fresh.stn)):
            if net is not None:
                for p, q in zip(net.parameters(), new.parameters(), strict=True):
                    p.copy_(q)


def _validate(run: _Run, epoch: int, warn: bool = True) -> dict[str, float]:
    """Validation loss and metrics (no refinement), TensorBoard panel, health warning."""
    model, val_set, device = run.model, run.val_set, run.device
    row = {"val_loss": validation_loss(model, val_set, device, model.cfg.batch_size)}
    res = evaluate(model, val_set, device, progress=False)
    message = health.warning(health.probe(model, val_set.src.to(device),
                                          val_set.trg.to(device)))
    if message is not None:
        row["val_stn_collapsed"] = 1.0
        if warn:
            tqdm.write(f"istn: warning: epoch {epoch}: {message}", file=sys.stderr)
    for k, v in mean_metrics(res.before_refinement).items():
        if v is not None:
            row[f"val_{k}"] = v
    for k, v in row.items():
        run.writer.add_scalar(f"val/{k[4:]}", v, epoch)
    panel = report.panel_tensor(val_set, res, 0)
    run.writer.add_image("val/pair0", panel, epoch, dataformats="HW")
    if run.save_temp:
        report.pair_grid(val_set, res, layout.val_picture(run.out, epoch),
                         names=model.cfg.soi_names)
    return row
