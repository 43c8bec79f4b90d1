"""Held-out evaluation during training (the ``eval:`` section): the EMA weights, every ``eval.every``
steps and at the end of the run, measured with the very code of ``prx eval --data``
(:func:`prx.metrics.evaluate_real.evaluate_real` on a :class:`prx.pipeline.Pipeline` of the EMA model).

The held-out set is opened and the extractors are loaded once, when the trainer sets up: a missing
weight file or bad data stops the run before step 0 with ``prx eval``'s one-line error (its option
names read as the config keys). Every rank evaluates its share of the samples; an FSDP2-sharded EMA
copy is gathered for the evaluation and resharded after it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

import torch

from prx.config.sampling import EvalConfig
from prx.distributed import gathered_for_inference
from prx.errors import PrxError
from prx.metrics import VAL_LOSS_BINS, parse_metrics
from prx.pipeline import Pipeline
from prx.rundir import RunDir

# prx eval's options in its error messages → the config keys a training run sets
_AS_CONFIG_KEY = {"--data": "eval.data", "--num-samples": "eval.num_samples", "--batch-size": "eval.batch_size",
                  "--resolution": "eval.resolution", "--caption-column": "eval.caption_column",
                  "--metrics": "eval.metrics", "--inception-weights": "eval.inception_weights",
                  "--clip-model": "eval.clip_model", "--dino-model": "eval.dino_model"}
_OPTION = re.compile("|".join(re.escape(o) + r"(?![\w-])" for o in sorted(_AS_CONFIG_KEY, key=len, reverse=True)))


def as_config_keys(message: str) -> str:
    return _OPTION.sub(lambda m: _AS_CONFIG_KEY[m.group(0)], message)


def results_path(run: RunDir, step: int) -> Path:
    """Where an evaluation of step N is written: where ``prx eval --data`` writes by default, so the
    two never disagree about a step, and the shapes-world ``prx eval`` (``RUN/eval/step_N/``) keeps its
    own results.json."""
    return run.real_eval_dir(step) / "results.json"


def eval_scalars(results: dict) -> dict[str, float | int | None]:
    """``evaluate_real``'s results as logged scalars: eval/fid, eval/val_loss, eval/val_loss_t0.0-0.3, …,
    and eval/num_samples (the samples every number here was computed on)."""
    out: dict[str, float | int | None] = {}
    for name, r in results["metrics"].items():
        out[f"eval/{name}"] = r["value"]
        if name == "val_loss":
            for (low, high), b in zip(VAL_LOSS_BINS, r["bins"].values()):
                out[f"eval/val_loss_t{low:.1f}-{high:.1f}"] = b["value"]
        if name == "clip_score" and "real_images" in r:
            out["eval/clip_score_real_images"] = r["real_images"]
    out["eval/num_samples"] = results["settings"]["evaluated"]
    out["eval/seconds"] = results["settings"]["seconds"]
    return out


def summary_line(step: int, results: dict) -> str:
    parts = [f"{k[5:]} {v:.5g}" for k, v in eval_scalars(results).items()
             if v is not None and k not in ("eval/num_samples", "eval/seconds") and not k.startswith("eval/val_loss_t")]
    s = results["settings"]
    return (f"eval at step {step}: {', '.join(parts)} ({s['evaluated']} held-out samples, {s['seconds']:g} s)")


class TrainingEval:
    """The run's ``eval:`` section made ready: held-out set opened, extractors loaded (once)."""

    def __init__(self, cfg: EvalConfig, every: int, names: list[str], heldout, extractors: dict):
        self.cfg, self.every, self.names, self.heldout, self.extractors = cfg, every, names, heldout, extractors
        self.warned: set[str] = set()

    @classmethod
    def build(cls, config) -> "TrainingEval | None":
        """None when the run does not evaluate; else every check ``prx eval --data`` does before
        sampling, as one-line errors that name the ``eval.*`` keys. Extractors stay on the CPU between
        evaluations (off the accelerator's memory while training)."""
        # the metrics (torchmetrics, the extractors) load only for a run that evaluates
        from prx.metrics.evaluate_real import HeldOutSet, build_extractors, check_sample_count

        cfg = config.eval
        every = cfg.cadence(config)
        if not every:
            return None
        try:
            names = parse_metrics(list(cfg.metrics))
            heldout = HeldOutSet.open(cfg.data, cfg.num_samples, cfg.seed, cfg.caption_column)
            check_sample_count(names, len(heldout))
            extractors = build_extractors(names, cfg.inception_weights, cfg.clip_model, cfg.dino_model, "cpu")
        except PrxError as e:
            raise type(e)(as_config_keys(str(e))) from None
        return cls(cfg, every, names, heldout, extractors)

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def describe(self) -> str:
        return (f"eval: {', '.join(self.names)} on {len(self.heldout)} held-out samples of {len(self.heldout.paths)} "
                f"shard(s) every {self.every} steps and at the end")

    def run(self, ema_model, text_encoder, config, device: torch.device, resolution: int, sharded: bool) -> dict:
        """``evaluate_real`` on the EMA weights; every rank calls it (each evaluates its share) and gets
        the results."""
        from prx.metrics.evaluate_real import evaluate_real  # loaded with the run's first evaluation (see build)

        cfg = self.cfg
        pipe = Pipeline(ema_model, text_encoder, config, device)
        for extractor in self.extractors.values():
            extractor.to(device)
        try:
            with contextlib.ExitStack() as scope:
                if sharded:
                    scope.enter_context(gathered_for_inference(ema_model))
                if hasattr(text_encoder, "cache_scope"):  # held-out captions are encoded anew, not kept in the cache
                    scope.enter_context(text_encoder.cache_scope())
                results = evaluate_real(pipe, None, self.names, len(self.heldout), seed=cfg.seed,
                                        batch_size=cfg.batch_size, resolution=cfg.resolution or resolution,
                                        sampling=cfg.sampling(config.sampling), extractors=self.extractors,
                                        heldout=self.heldout)
        finally:
            for extractor in self.extractors.values():
                extractor.to("cpu")
        return results

    def report(self, logger, run: RunDir, step: int, results: dict, checkpoint: Path | None) -> Path:
        """Rank 0: the results into metrics.jsonl / TensorBoard / W&B, a log line, new warnings once,
        and ``RUN/eval/step_N/real/results.json``."""
        path = self.write(run, step, results, checkpoint)
        logger.log(step, eval_scalars(results))
        logger.line(f"{summary_line(step, results)} → {path}")
        for warning in self.new_warnings(results):  # each one once, not at every evaluation
            logger.line(f"warning: eval: {warning}")
        return path

    def new_warnings(self, results: dict) -> list[str]:
        new = [w for w in results["warnings"] if w not in self.warned]
        self.warned.update(new)
        return new

    @staticmethod
    def write(run: RunDir, step: int, results: dict, checkpoint: Path | None) -> Path:
        """``RUN/eval/step_N/real/results.json``, as ``prx eval --data`` writes it, plus where it came from."""
        path = results_path(run, step)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {**results, "step": step, "weights": "ema", "during_training": True,
                "checkpoint": str(checkpoint) if checkpoint is not None else None}
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, path)
        return path

