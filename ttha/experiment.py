"""One TTHA experiment: build → pretrain (cached) → quantize → test-time phase → summary.

`run(cfg)` is what train.py calls. Everything that can reject the config runs before the
MLflow run starts or any training happens; the run is FINISHED, FAILED or KILLED at the end,
and the sampler thread and stressor are stopped on every path.
"""
from __future__ import annotations

import contextlib
import csv
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ttha import config as config_mod
from ttha import costs, data, model as model_mod, plots, pretrain, routing, runtime, serving, serving_decode, sim
from ttha import run_info, stress, telemetry, tracking, ttt
from ttha.paths import output_dir

log = logging.getLogger(__name__)


def write_csv(rows: list[dict], path: Path) -> Path:
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k != "step", k))
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    return path


def print_summary(cfg: DictConfig, summary: dict, info: dict, source: str) -> None:
    keys = ["eval/perplexity", "eval/tokens_per_s", "eval/energy_per_token_j", "eval/mean_power_w",
            "eval/p50_latency_ms", "eval/p99_latency_ms", "eval/max_temp_c", "eval/time_over_power_target_frac",
            "eval/time_over_temp_target_frac", "eval/late_perplexity", "eval/late_mean_power_w",
            "eval/late_energy_per_token_j", "ttt/skip_frac", "ttt/light_frac", "overhead/ttt_frac",
            "overhead/telemetry_frac", "overhead/logging_frac", "overhead/ttha_update_frac", "overhead/ttha_host_frac",
            "overhead/router_bias_frac"]
    keys += sorted(k for k in summary if k.startswith("experts/mean_activated_"))  # decode: what the steps read
    width = max(len(k) for k in keys)
    lines = [f"TTHA run: experts={cfg.experts.name} router={cfg.router.name} telemetry={source} "
             f"stress={cfg.stress.kind} workload={cfg.workload.kind} ttt={cfg.ttt.policy}",
             f"{'pretrain/test_perplexity'.ljust(width)}  {info['test_perplexity']:.4g}"
             f"   (byte-unigram {info['unigram_perplexity']:.4g})"]
    lines += [f"{k.ljust(width)}  {summary[k]:.4g}" for k in keys if k in summary]
    print("\n".join(lines), flush=True)


def run(cfg: DictConfig) -> list[float]:
    """Run one experiment; return the summary metrics named by cfg.objectives."""
    config_mod.validate(cfg)
    # the process: where it writes, which device, seeds, host threads, kernels, what SIGTERM does
    out = output_dir()
    device = runtime.resolve_device(cfg.device)
    runtime.limit_host_threads(device)
    backend = runtime.set_kernel_backend(cfg.kernels)
    runtime.seed_everything(int(cfg.seed))
    runtime.install_signal_handlers()
    monitor = telemetry.build_monitor(cfg.telemetry, device)  # telemetry=nvml without a GPU fails here
    cost_model = costs.KernelCostModel.load(cfg.get("cost_model"))
    corpus = data.cached_corpus(cfg.data, pretrain.cache_dir(cfg))

    decode = cfg.workload.kind == "decode"
    tracker = tracking.tracker_from_config(cfg.tracking, serving_decode.LOG_EVERY if decode else 1)
    tags = {"telemetry.source": monitor.source, "device": str(device), "kernels.backend": backend,
            "cost_model": cost_model.source, **dict(cfg.tracking.get("tags") or {})}
    tracker.start(run_info.run_name(cfg), {**tags, **run_info.factors(cfg)}, cfg.tracking.get("parent_run_id"))
    tracker.set_note(run_info.note(cfg))
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
        runtime.seed_everything(int(cfg.seed))  # serving draws the same numbers whether pretraining ran or was cached
        model_mod.quantize_experts(model, list(cfg.experts.bits), int(cfg.experts.group_size))
        model.eval()
        bits = model_mod.expert_bits(model)
        router = routing.AdaptiveRouter(cfg.model.n_experts, cfg.model.top_k, bits, cost_model, cfg.router,
                                        cfg.objective, cfg.targets, device, decode=decode)
        model.set_router(router)
        tokens = int(cfg.test.batch_size) * int(cfg.test.seq_len)
        sim_work = sim.SimWork(cost_model, bits, int(cfg.model.top_k), tokens, cfg.telemetry.get("sim") or {},
                               int(cfg.model.n_layers))

        serve = serving_decode.serve if decode else serving.serve
        with runtime.steady_heap():
            rows, summary = serve(serving.Serving(
                cfg=cfg, model=model, corpus=corpus, router=router,
                policy=ttt.TTTPolicy(cfg.ttt, cost_model, cfg.targets), trainer=ttt.TestTimeTrainer(model, cfg.ttt),
                monitor=monitor, stressor=stressor, sim_work=sim_work, tracker=tracker, device=device))
        stressor.stop()
        tracker.log_summary(summary)
        tracker.set_tags({"expert_bits": ",".join(map(str, bits))})
        tracker.set_note(run_info.note(cfg, summary))
        artifacts = [config_path, write_csv(rows, out / "steps.csv")]
        artifacts += plots.draw(cfg.tracking.plots, rows, OmegaConf.to_container(cfg.targets), bits, out)
        tracker.log_artifacts(artifacts)
        print_summary(cfg, summary, info, monitor.source)

    summary.update({"pretrain/test_perplexity": info["test_perplexity"]})
    return [float(summary[name]) for name in cfg.objectives]
