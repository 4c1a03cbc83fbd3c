"""Joint training of ITN and STN with Adam; validation, checkpoints, TensorBoard."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import report
from ..data import PairSet
from ..errors import IstnError
from ..io import write_text
from ..losses import needs_seg, training_loss
from ..metrics import mean_metrics
from .evaluate import evaluate
from .model import CHECKPOINT, Model, read_checkpoint, save_checkpoint, write_model_info


def _batch(ps: PairSet, idx: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor | None]:
    get = lambda t: t[idx].to(device, non_blocking=True) if t is not None else None  # noqa: E731
    return {k: get(getattr(ps, k)) for k in ("src", "trg", "src_seg", "trg_seg")}


def step_loss(model: Model, b: dict, smoothness: float = 0.0
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward one batch and return the strategy's loss and its terms."""
    s_p, t_p = model.primes(b["src"], b["trg"])
    params = model.stn(torch.cat([s_p, t_p], dim=1))
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
    ``val_interval`` epochs and at the end; each writes ``checkpoint_epochNNNN.pt``
    and updates ``checkpoint.pt`` (the latest). Batches are shuffled with a generator
    seeded by (seed, epoch), so a resumed run sees the same batches.
    """
    cfg = model.cfg
    torch.set_flush_denormal(True)  # denormals slow CPU training without changing results
    if needs_seg(model.strategy) and train_set.src_seg is None:
        raise IstnError(f"strategy '{model.strategy}' needs training segmentations: "
                        "give --train_seg")
    model_dir = out / "train" / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate)
    start, history = 1, []
    if resume and (model_dir / CHECKPOINT).is_file():
        state = read_checkpoint(model_dir / CHECKPOINT)
        model.stn.load_state_dict(state["stn"])
        if model.itn is not None:
            model.itn.load_state_dict(state["itn"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        start = int(state["epoch"]) + 1
        history = json.loads(state["extra"].get("history", "[]"))
    write_model_info(model, model_dir)
    writer = report.tensorboard_writer(out / "tensorboard")
    n = len(train_set)
    bar = tqdm(range(start, cfg.epochs + 1), desc="train", disable=not progress,
               initial=start - 1, total=cfg.epochs)
    for epoch in bar:
        model.train(True)
        gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(n, generator=gen)
        t0, sums, count = time.perf_counter(), {}, 0
        for bi in range(0, n, cfg.batch_size):
            idx = order[bi:bi + cfg.batch_size]
            loss, terms = step_loss(model, _batch(train_set, idx, device), cfg.smoothness)
            if not torch.isfinite(loss):
                raise IstnError(f"training loss became {loss.item()} at epoch {epoch}, batch "
                                f"{bi // cfg.batch_size + 1}; the last good checkpoint is in "
                                f"'{model_dir}'. Lower learning_rate or normalise the images")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            for k, v in {"loss": loss, **terms}.items():
                sums[k] = sums.get(k, 0.0) + v.detach() * len(idx)
            count += len(idx)
        row = {"epoch": epoch, "seconds": time.perf_counter() - t0}
        row.update({f"train_{k}": float(v) / count for k, v in sums.items()})
        for k, v in row.items():
            if k.startswith("train_"):
                writer.add_scalar(f"train/{k[6:]}", v, epoch)
        writer.add_scalar("train/seconds_per_epoch", row["seconds"], epoch)
        bar.set_postfix(loss=f"{row['train_loss']:.4g}")
        if epoch == 1 or epoch % cfg.val_interval == 0 or epoch == cfg.epochs:
            if val_set is not None and len(val_set):
                row.update(_validate(model, val_set, device, writer, epoch, out, save_temp))
            history.append(row)
            save_checkpoint(model, model_dir / f"checkpoint_epoch{epoch:04d}.pt", opt, epoch,
                            {"history": json.dumps(history)})
            save_checkpoint(model, model_dir / CHECKPOINT, opt, epoch,
                            {"history": json.dumps(history)})
        else:
            history.append(row)
    bar.close()
    writer.close()
    write_text(json.dumps(history, indent=1) + "\n", out / "train" / "history.json")
    report.loss_curve(history, out / "train" / "loss_curve.png")
    return model_dir


def _validate(model: Model, val_set: PairSet, device, writer, epoch: int, out: Path,
              save_temp: bool) -> dict[str, float]:
    row = {"val_loss": validation_loss(model, val_set, device, model.cfg.batch_size)}
    res = evaluate(model, val_set, device, refine_iters=0, progress=False)
    for k, v in mean_metrics(res["before_refinement"]).items():
        if v is not None:
            row[f"val_{k}"] = v
    for k, v in row.items():
        writer.add_scalar(f"val/{k[4:]}", v, epoch)
    panel = report.panel_tensor(val_set, res, 0)
    writer.add_image("val/pair0", panel, epoch, dataformats="HW")
    if save_temp:
        report.pair_grid(val_set, res, out / "train" / "temp" / f"val_epoch{epoch:04d}.png")
    return row
