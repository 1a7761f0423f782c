"""Lottery-ticket stages (Frankle & Carbin 2019): iterative magnitude pruning with rewinding.

Every pruning round of every trial is one run, made by one entry point:
- `train` (round 0): initialise, train dense; log the all-ones mask, the weights
  to rewind to (iteration `lottery.rewind_iteration`) and the trained weights.
- `prune` (round k, input: round k-1's run): prune round k-1's trained weights
  through its mask, rewind the survivors to the saved weights, train.
- `finetune` (control, input: a round's run): train that round's mask from a
  fresh random initialisation.
Each run logs the mask and the weights it started from, so any round can be
re-trained from its ticket, and the trained weights the next round prunes.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn

from prunelab import checkpoints, data as datasets, models, paths, tracking
from prunelab.config import StudyConfig
from prunelab.errors import ConfigError, ModelError
from prunelab.pruning import masks
from prunelab.stages import check_fits, common_params, common_tags
from prunelab.train import early_stop, fit_iterations

STAGE_TICKET_ROUND_0, STAGE_TICKET, STAGE_REINIT = "train", "prune", "reinit"


def steps(cfg: StudyConfig) -> list[tuple[str, int | None]]:
    """Per-trial chain for `study.run_study`: (entry point, index of the step whose run it reads)."""
    out: list[tuple[str, int | None]] = [("train", None)]
    ticket = 0
    for _ in range(cfg.lottery.rounds):
        out.append(("prune", ticket))
        ticket = len(out) - 1
        if cfg.lottery.reinit_control:
            out.append(("finetune", ticket))
    return out


def _load_data(cfg: StudyConfig) -> datasets.ImageData:
    data = datasets.get(cfg.data)
    if data.val_x is None:
        raise ConfigError("lottery tickets early-stop on the validation loss: set data.val_size > 0 "
                          "(5000 of CIFAR-10's 50000, or 10 % of a subset)")
    return data


def _tags(cfg: StudyConfig, trial: int, k: int, stage_control: str) -> dict:
    return {**common_tags(cfg, trial), "round": k, "control": stage_control}


def _params(cfg: StudyConfig, trial: int, k: int, mask: masks.Mask, source: str) -> dict:
    return {**common_params(cfg, trial), "method": cfg.lottery.strategy, "round": k,
            "fraction_remaining": round(mask.fraction_remaining(), 6), "input_run": source}


def _train_round(run: tracking.Run, cfg: StudyConfig, data: datasets.ImageData, model: nn.Module, mask: masks.Mask,
                 seed: int, k: int, start: int = 0, snapshot_at: int | None = None) -> dict | None:
    """Train under `mask` (pruned weights re-zeroed after every step) and log the
    evaluation series (step = iteration), the early-stopping point and per-layer counts.
    Returns the weights at iteration `snapshot_at` when asked."""
    lc = cfg.lottery
    snapshot: dict = {}
    done = [start]

    zero_pruned = mask.applier(model)

    def after_step() -> None:
        zero_pruned()
        done[0] += 1
        if done[0] == snapshot_at:
            snapshot.update({n: t.detach().clone() for n, t in model.state_dict().items()})

    if snapshot_at == start:
        snapshot.update({n: t.detach().clone() for n, t in model.state_dict().items()})
    augment = datasets.random_crop_flip if data.augment else None
    history = fit_iterations(model, data, cfg.train, lc.iterations, lc.eval_every, seed, start=start,
                             on_eval=lambda r: run.log_metrics(r.metrics(), step=r.iteration, flush=False),
                             desc=f"round {k}", after_step=after_step, augment=augment)
    best, last = early_stop(history), history[-1]
    params = dict(model.named_parameters())
    summary = {"early_stop_iteration": best.iteration, "early_stop_test_accuracy": best.test_accuracy,
               "early_stop_test_loss": best.test_loss, "early_stop_val_loss": best.val_loss,
               "final_test_accuracy": last.test_accuracy, "fraction_remaining": mask.fraction_remaining()}
    for name, keep in mask.items():
        summary[f"params.{name}"] = keep.numel()
        summary[f"remaining.{name}"] = int(keep.sum())
        summary[f"nonzero.{name}"] = int(torch.count_nonzero(params[name]))
    run.log_metrics(summary, step=k)  # flushes the buffered series too
    run.log_text(mask.report(), "mask_report.txt")
    return snapshot or None


def _log_ticket(run: tracking.Run, mask: masks.Mask, start_model: nn.Module, tmp: Path) -> None:
    """The mask and the weights training starts from: enough to re-train this round."""
    torch.save(mask.state(), tmp / paths.MASK)
    run.log_file(tmp / paths.MASK)
    run.log_file(checkpoints.save(start_model, tmp / paths.REWIND_WEIGHTS))


def round_zero(cfg: StudyConfig, trial: int = 0) -> str:
    """Round 0: the dense network from its seeded initialisation; returns the run id."""
    lc, seed = cfg.lottery, cfg.seed + trial
    data = _load_data(cfg)
    torch.manual_seed(seed)
    model = models.build(cfg.model, data.input_shape, data.num_classes)
    check_fits(model, data)
    masks.check_rounds(lc, model, lc.rounds)  # refuse an impossible study before anything trains
    mask = masks.Mask.ones_like(model)
    with tracking.run(cfg.study, STAGE_TICKET_ROUND_0, _tags(cfg, trial, 0, "none"), f"lottery-t{trial}-r0") as run, \
            tempfile.TemporaryDirectory() as tmp:
        run.log_params(_params(cfg, trial, 0, mask, "initialised in this run"))
        rewind_to = _train_round(run, cfg, data, model, mask, seed, 0, snapshot_at=lc.rewind_iteration)
        start_model = models.get(cfg.model, **model.spec())
        start_model.load_state_dict(rewind_to)
        _log_ticket(run, mask, start_model, Path(tmp))
        run.log_file(checkpoints.save(model, Path(tmp) / paths.CHECKPOINT))
        return run.run_id


def _read_round(cfg: StudyConfig, run_ref: str, tmp: Path) -> tuple[int, nn.Module, masks.Mask, nn.Module]:
    """(round, trained model, mask, model holding the weights to rewind to) of a ticket run."""
    source = tracking.get_run(run_ref)
    tags = source.data.tags
    if tags.get(paths.TAG_STAGE) not in (STAGE_TICKET_ROUND_0, STAGE_TICKET) or "round" not in source.data.params:
        raise ModelError(f"run {run_ref} is not a lottery-ticket round (stage {tags.get(paths.TAG_STAGE, '?')}): "
                         "pass the run id of a train (round 0) or prune round of this study")
    k = int(source.data.params["round"])
    trained = checkpoints.load(tracking.download(run_ref, paths.CHECKPOINT, tmp), cfg.model)
    start = checkpoints.load(tracking.download(run_ref, paths.REWIND_WEIGHTS, tmp), cfg.model)
    mask = masks.Mask(torch.load(tracking.download(run_ref, paths.MASK, tmp), map_location="cpu", weights_only=True))
    mask.check_fits(trained)
    return k, trained, mask, start


def next_round(cfg: StudyConfig, trial: int, model_ref: str | None) -> str:
    """Round k+1 from round k's run: prune, rewind, retrain; returns the run id."""
    if not model_ref:
        raise ConfigError("a lottery pruning round needs --model-uri: the run id of the previous round")
    lc, seed = cfg.lottery, cfg.seed + trial
    data = _load_data(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        k, trained, mask, start = _read_round(cfg, model_ref, Path(tmp))
        check_fits(trained, data)
        masks.check_rounds(lc, trained, k + 1)
        new_mask = masks.prune(lc, trained, mask, seed=seed * 1000 + k + 1)
        model = trained  # reuse the module: its weights are replaced by the rewind weights below
        masks.rewind(model, start.state_dict(), new_mask)
        with tracking.run(cfg.study, STAGE_TICKET, _tags(cfg, trial, k + 1, "none"), f"lottery-t{trial}-r{k + 1}") as run:
            run.log_params(_params(cfg, trial, k + 1, new_mask, model_ref))
            _log_ticket(run, new_mask, model, Path(tmp))
            _train_round(run, cfg, data, model, new_mask, seed, k + 1, start=lc.rewind_iteration)
            run.log_file(checkpoints.save(model, Path(tmp) / paths.CHECKPOINT))
            return run.run_id


def reinit_control(cfg: StudyConfig, trial: int, model_ref: str | None) -> str:
    """Control: a round's mask trained from a fresh random initialisation; returns the run id."""
    if not model_ref:
        raise ConfigError("the random re-initialisation control needs --model-uri: the run id of a pruning round")
    seed = cfg.seed + trial
    data = _load_data(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        k, model, mask, _ = _read_round(cfg, model_ref, Path(tmp))
        check_fits(model, data)
        masks.reinitialise(model, mask, seed=100_000 + 1000 * seed + k)
        with tracking.run(cfg.study, STAGE_REINIT, _tags(cfg, trial, k, "reinit"), f"reinit-t{trial}-r{k}") as run:
            run.log_params(_params(cfg, trial, k, mask, model_ref))
            _log_ticket(run, mask, model, Path(tmp))
            _train_round(run, cfg, data, model, mask, seed, k)
            return run.run_id


# Entry point -> stage function for the `lottery_ticket` kind.
STAGES = {"train": round_zero, "prune": next_round, "finetune": reinit_control}
