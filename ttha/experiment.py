"""One TTHA experiment: build → pretrain (cached) → quantize → test-time phase → summary.

`run(cfg)` is what train.py calls. Everything that can reject the config runs before the
MLflow run starts or any training happens; the run is FINISHED, FAILED or KILLED at the end,
and the sampler thread and stressor are stopped on every path.
"""
from __future__ import annotations

import contextlib
import csv
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from ttha import config as config_mod
from ttha import (costs, data, model as model_mod, plots, pretrain, routing, runtime, sim, stress, telemetry, tracking,
                  ttt)
from ttha.paths import output_dir

log = logging.getLogger(__name__)

TTT_CODE = {"skip": 0, "light": 1, "full": 2}


class Pacer:
    """Arrival times of test batches: back to back (saturated) or at a fixed token rate (paced)."""

    def __init__(self, workload: DictConfig, tokens_per_batch: int):
        self.interval = tokens_per_batch / float(workload.tokens_per_s) if workload.kind == "paced" else 0.0
        self.t0 = time.perf_counter()

    def restart(self) -> None:
        self.t0 = time.perf_counter()

    def wait(self, i: int) -> float:
        """Sleep until batch i arrives (paced); return its arrival time."""
        if self.interval == 0.0:
            return time.perf_counter()
        arrival = self.t0 + i * self.interval
        ahead = arrival - time.perf_counter()
        if ahead > 0:
            time.sleep(ahead)
        return arrival


def _usage_array(router, n_experts: int) -> np.ndarray:
    u = router.usage()
    u = u.detach().float().cpu().numpy() if torch.is_tensor(u) else np.asarray(u, dtype=float)
    return u if u.shape == (n_experts,) else np.full(n_experts, 1.0 / n_experts)


def _gpu_marker(device: torch.device):
    """An event at the current end of the device's queue (None on the CPU, where work is synchronous)."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record()
    return event


def serve(cfg: DictConfig, model, corpus, router, policy, trainer, monitor, stressor, sim_work,
          tracker, device: torch.device) -> tuple[list[dict], dict]:
    """The test-time phase. Returns the per-step records and the summary metrics."""
    B, S = int(cfg.test.batch_size), int(cfg.test.seq_len)
    tokens = B * S
    n_warm, n_meas = int(cfg.test.warmup_batches), int(cfg.test.n_batches)
    n_experts = sim_work.n_experts
    adaptive = bool(cfg.router.adaptive)
    update_every = int(cfg.router.get("update_every", 1))
    pacer = Pacer(cfg.workload, tokens)
    targets = cfg.targets

    rows: list[dict] = []
    nll_sum, ntok, ttt_modes = 0.0, 0, []
    latency_ms = 0.0
    energy0 = t_meas0 = None
    overhead = {"telemetry_s": 0.0, "log_s": 0.0, "bias_s": 0.0, "ttha_s": 0.0, "ttha_exposed_s": 0.0, "step_s": 0.0}
    batches = data.stream_batches(corpus.test, B, S, n_warm + n_meas)
    bar = tqdm(batches, total=n_warm + n_meas, desc="test-time phase", unit="batch", dynamic_ncols=True,
               mininterval=pretrain.progress_interval())
    for i, batch in enumerate(bar):
        step = i - n_warm
        if i == n_warm:  # warm-up done: stress starts, the clock and energy counter are read
            stressor.start()
            pacer.restart()
            s0 = monitor.latest()
            energy0, t_meas0 = s0.energy_j, time.perf_counter()
        arrival = pacer.wait(max(step, 0)) if step >= 0 else time.perf_counter()
        t_start = time.perf_counter()
        sample = monitor.latest()
        t_tel = time.perf_counter()
        batch = batch.to(device, non_blocking=True)
        x, y = batch[:, :-1], batch[:, 1:]
        t_bias = time.perf_counter()
        router.begin_step(sample, latency_ms)
        t_bias_end = time.perf_counter()

        with torch.no_grad():  # prequential: evaluate before any adaptation on this batch
            logits = model(x)
            nll = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum")
        update = adaptive and i % update_every == 0
        router.stage(for_update=update)  # host copies complete with the loss read below: one sync a step
        nll = float(nll)
        task_loss = nll / y.numel()

        t_served = time.perf_counter()
        mode, reason = policy.decide(sample, tokens, latency_ms)
        t_ttt = time.perf_counter()
        trainer.step(batch, mode)
        t_ttt_end = time.perf_counter()

        # The adapter update is host work: while the GPU runs the TTT step just queued it costs the step
        # nothing. It counts as exposed unless the GPU is still busy when it ends (no TTT: always exposed).
        queued = _gpu_marker(device)
        terms = {}
        t_ttha = time.perf_counter()
        if update:
            terms = router.update_ttha(sample, latency_ms, task_loss)
        t_ttha_end = time.perf_counter()
        exposed = queued is None or queued.query()

        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t_end = time.perf_counter()
        latency_ms = (t_end - arrival) * 1000.0  # queueing included when paced

        usage = _usage_array(router, n_experts)
        monitor.report_work(sim_work.relative_power(usage, t_served - t_start, t_ttt_end - t_ttt, pacer.interval))

        if step < 0:
            continue
        nll_sum += nll
        ntok += y.numel()
        ttt_modes.append(mode)
        row = {
            "step": step, "t": t_end - t_meas0, "latency_ms": latency_ms, "ttt/reason": reason,
            "telemetry/power_w": sample.power_w, "telemetry/temp_c": sample.temp_c,
            "telemetry/util_pct": sample.util_pct, "telemetry/sm_clock_mhz": sample.sm_clock_mhz,
            "telemetry/energy_j": sample.energy_j - energy0, "ttt/mode": TTT_CODE[mode],
            "router/balance_score": router.balance_score, "eval/batch_loss": task_loss,
        }
        row.update({f"experts/usage_{e}": float(u) for e, u in enumerate(usage)})
        row.update({f"loss/{k}": float(v) for k, v in terms.items()})
        rows.append(row)
        t_log = time.perf_counter()
        tracker.log_step(step, {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"})
        t_log_end = time.perf_counter()
        overhead["telemetry_s"] += t_tel - t_start
        overhead["bias_s"] += t_bias_end - t_bias
        overhead["ttha_s"] += t_ttha_end - t_ttha
        overhead["ttha_exposed_s"] += t_ttha_end - t_ttha if exposed else 0.0
        overhead["log_s"] += t_log_end - t_log
        overhead["step_s"] += t_log_end - t_start
        bar.set_postfix(power=f"{sample.power_w:.0f}W", temp=f"{sample.temp_c:.0f}C", ttt=mode, refresh=False)

    wall = time.perf_counter() - t_meas0
    energy = monitor.latest().energy_j - energy0
    power = np.array([r["telemetry/power_w"] for r in rows])
    temp = np.array([r["telemetry/temp_c"] for r in rows])
    summary = {
        "eval/perplexity": math.exp(nll_sum / max(ntok, 1)),
        "eval/tokens_per_s": ntok / wall,
        "eval/energy_per_token_j": energy / max(ntok, 1),
        "eval/mean_power_w": float(power.mean()),
        "eval/max_temp_c": float(temp.max()),
        "eval/time_over_power_target_frac": float((power > targets.power_w).mean()),
        "eval/time_over_temp_target_frac": float((temp > targets.temp_c).mean()),
        "eval/mean_latency_ms": float(np.mean([r["latency_ms"] for r in rows])),
        "ttt/skip_frac": ttt_modes.count("skip") / max(len(ttt_modes), 1),
        "ttt/light_frac": ttt_modes.count("light") / max(len(ttt_modes), 1),
        "overhead/telemetry_frac": overhead["telemetry_s"] / overhead["step_s"],
        "overhead/logging_frac": overhead["log_s"] / overhead["step_s"],
        "overhead/ttha_update_frac": overhead["ttha_exposed_s"] / overhead["step_s"],
        "overhead/ttha_host_frac": overhead["ttha_s"] / overhead["step_s"],
        "overhead/router_bias_frac": overhead["bias_s"] / overhead["step_s"],
        "telemetry/read_errors": float(getattr(monitor, "error_count", 0)),
    }
    for e in range(n_experts):
        summary[f"experts/mean_usage_{e}"] = float(np.mean([r[f"experts/usage_{e}"] for r in rows]))
    return rows, summary


def write_csv(rows: list[dict], path: Path) -> Path:
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k != "step", k))
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    return path


def print_summary(cfg: DictConfig, summary: dict, info: dict, source: str) -> None:
    keys = ["eval/perplexity", "eval/tokens_per_s", "eval/energy_per_token_j", "eval/mean_power_w",
            "eval/max_temp_c", "eval/time_over_power_target_frac", "eval/time_over_temp_target_frac",
            "ttt/skip_frac", "overhead/telemetry_frac", "overhead/logging_frac", "overhead/ttha_update_frac",
            "overhead/ttha_host_frac", "overhead/router_bias_frac"]
    width = max(len(k) for k in keys)
    lines = [f"TTHA run: experts={cfg.experts.name} router={cfg.router.name} telemetry={source} "
             f"stress={cfg.stress.kind} workload={cfg.workload.kind} ttt={cfg.ttt.policy}",
             f"{'pretrain/test_perplexity'.ljust(width)}  {info['test_perplexity']:.4g}"
             f"   (byte-unigram {info['unigram_perplexity']:.4g})"]
    lines += [f"{k.ljust(width)}  {summary[k]:.4g}" for k in keys]
    print("\n".join(lines), flush=True)


def run(cfg: DictConfig) -> list[float]:
    """Run one experiment; return the summary metrics named by cfg.objectives."""
    config_mod.validate(cfg)
    out = output_dir()
    device = runtime.resolve_device(cfg.device)
    runtime.limit_host_threads(device)
    backend = runtime.set_kernel_backend(cfg.kernels)
    runtime.seed_everything(int(cfg.seed))
    runtime.install_signal_handlers()
    monitor = telemetry.build_monitor(cfg.telemetry, device)  # telemetry=nvml without a GPU fails here
    cost_model = costs.KernelCostModel.load(cfg.get("cost_model"))
    corpus = data.cached_corpus(cfg.data, pretrain.cache_dir(cfg))

    tracker = tracking.tracker_from_config(cfg.tracking)
    tags = {"telemetry.source": monitor.source, "device": str(device), "kernels.backend": backend,
            "cost_model": cost_model.source, **dict(cfg.tracking.get("tags") or {})}
    tracker.start(cfg.tracking.run_name or f"{cfg.experts.name}-{cfg.router.name}-s{cfg.seed}", tags,
                  cfg.tracking.get("parent_run_id"))
    log.info("telemetry source: %s; device: %s; kernels: %s; MLflow: %s", monitor.source, device, backend,
             tracker.uri)
    with tracker, contextlib.ExitStack() as stack:
        tracker.log_params(config_mod.flatten(cfg))
        config_path = out / "config.yaml"
        config_path.write_text(OmegaConf.to_yaml(cfg, resolve=True))
        stack.enter_context(monitor)
        stressor = stack.enter_context(stress.build_stressor(cfg.stress, device, monitor))

        model, info = pretrain.load_or_train(cfg, device, corpus)
        tracker.log_summary({"pretrain/test_perplexity": info["test_perplexity"],
                             "pretrain/unigram_perplexity": info["unigram_perplexity"],
                             "pretrain/cached": float(info["cached"]), "pretrain/seconds": info["seconds"]})
        model_mod.quantize_experts(model, list(cfg.experts.bits), int(cfg.experts.group_size))
        model.eval()
        bits = model_mod.expert_bits(model)
        router = routing.AdaptiveRouter(cfg.model.n_experts, cfg.model.top_k, bits, cost_model, cfg.router,
                                        cfg.objective, cfg.targets, device)
        model.set_router(router)
        policy = ttt.TTTPolicy(cfg.ttt, cost_model, cfg.targets)
        trainer = ttt.TestTimeTrainer(model, cfg.ttt)
        tokens = int(cfg.test.batch_size) * int(cfg.test.seq_len)
        sim_work = sim.SimWork(cost_model, bits, int(cfg.model.top_k), tokens, cfg.telemetry.get("sim") or {})

        rows, summary = serve(cfg, model, corpus, router, policy, trainer, monitor, stressor, sim_work,
                              tracker, device)
        stressor.stop()
        tracker.log_summary(summary)
        tracker.set_tags({"expert_bits": ",".join(map(str, bits))})
        artifacts = [config_path, write_csv(rows, out / "steps.csv")]
        if cfg.tracking.plots:
            t = OmegaConf.to_container(cfg.targets)
            artifacts += [plots.telemetry_timeline(rows, t, out / "telemetry.png"),
                          plots.expert_usage(rows, bits, out / "expert_usage.png"),
                          plots.loss_terms(rows, out / "loss_terms.png")]
        tracker.log_artifacts(artifacts)
        print_summary(cfg, summary, info, monitor.source)

    summary.update({"pretrain/test_perplexity": info["test_perplexity"]})
    return [float(summary[name]) for name in cfg.objectives]
