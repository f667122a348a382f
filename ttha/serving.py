"""The test-time phase: the stream is served step by step, on the run's clock, while the router adapts and the
TTT policy trains or not. serve() serves batches (the saturated and paced workloads: a forward over whole
sequences, what prefill does); serving_decode.serve() serves the same bytes one token per stream per step.

Both share what is here: the run's clock (simulated or wall), the pacer, the step's time accounting, the
Serving bundle run() builds, and the summary metrics of the measured steps.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from omegaconf import DictConfig
from tqdm import tqdm

from ttha import data, model as model_mod, pretrain, routing, sim, telemetry, tracking, ttt
from ttha.gpu import Stressor

TTT_CODE = {"skip": 0, "light": 1, "full": 2}

class RunClock:
    """The clock the test-time phase runs on. Under sim telemetry the simulated GPU's: it moves by the modelled
    cost of each step's work (busy) and by pacing gaps (wait_until: the GPU idles), so a run reads the same
    times and telemetry on any host. Otherwise the wall clock: work takes its own time, wait_until sleeps."""

    def __init__(self, monitor):
        self.monitor = monitor
        self.simulated = bool(getattr(monitor, "simulated", False))

    def now(self) -> float:
        return self.monitor.clock() if self.simulated else time.perf_counter()

    def wait_until(self, t: float) -> None:
        ahead = t - self.now()
        if ahead > 0:
            self.monitor.wait(ahead)

    def busy(self, seconds: float, relative_power: float) -> None:
        """The simulated GPU works `seconds` at `relative_power` (nothing to do on the wall clock)."""
        if self.simulated:
            self.monitor.run_work(seconds, relative_power)


class Pacer:
    """Arrival times of test batches on the run's clock: back to back (saturated) or at a fixed rate (paced)."""

    def __init__(self, clock: RunClock, interval_s: float):
        self.clock, self.interval = clock, float(interval_s)
        self.t0 = clock.now()

    def restart(self) -> None:
        self.t0 = self.clock.now()

    def wait(self, i: int) -> float:
        """Wait until batch i arrives (paced); return its arrival time."""
        if self.interval == 0.0:
            return self.clock.now()
        arrival = self.t0 + i * self.interval
        self.clock.wait_until(arrival)
        return arrival


def arrival_interval(workload: DictConfig, tokens_per_batch: int) -> float:
    """Seconds between arrivals: 0 when saturated."""
    return tokens_per_batch / float(workload.tokens_per_s) if workload.kind == "paced" else 0.0


def usage_array(router, n_experts: int) -> np.ndarray:
    u = router.usage()
    u = u.detach().float().cpu().numpy() if torch.is_tensor(u) else np.asarray(u, dtype=float)
    return u if u.shape == (n_experts,) else np.full(n_experts, 1.0 / n_experts)


def gpu_marker(device: torch.device):
    """An event at the current end of the device's queue (None on the CPU, where work is synchronous)."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record()
    return event


@dataclass
class Serving:
    """Everything the test-time phase serves with, as run() builds it."""
    cfg: DictConfig
    model: model_mod.MoELM
    corpus: data.Corpus
    router: routing.AdaptiveRouter
    policy: ttt.TTTPolicy
    trainer: ttt.TestTimeTrainer
    monitor: telemetry.GpuSystemMonitor
    stressor: Stressor
    sim_work: sim.SimWork
    tracker: tracking.Tracker
    device: torch.device


class StepClock:
    """Where a step's wall time goes: named spans of the current step, summed over the measured steps into
    the run's overhead fractions (of the whole step's time)."""

    def __init__(self):
        self.total = dict.fromkeys(("telemetry", "bias", "ttha", "ttha_exposed", "ttt", "log", "step"), 0.0)
        self.start()

    def start(self) -> None:
        self.t0, self.span = time.perf_counter(), {}

    @contextlib.contextmanager
    def timed(self, name: str):
        t = time.perf_counter()
        yield
        self.span[name] = self.span.get(name, 0.0) + time.perf_counter() - t  # a span may recur (a record a step)

    def mark(self, name: str) -> None:
        """Name the time since the step started."""
        self.span[name] = time.perf_counter() - self.t0

    def count(self, exposed: bool) -> None:
        """Add this step to the totals; the adapter update only where it was exposed (see update_router)."""
        self.mark("step")
        for name in ("telemetry", "bias", "ttha", "ttt", "log", "step"):
            self.total[name] += self.span.get(name, 0.0)  # a decode replay with nothing to learn from has no ttha
        self.total["ttha_exposed"] += self.span.get("ttha", 0.0) if exposed else 0.0

    def fraction(self, name: str) -> float:
        return self.total[name] / self.total["step"]


def _evaluate(s: Serving, batch: torch.Tensor, update: bool) -> tuple[float, int]:
    """(summed next-byte NLL, tokens) of the batch, before any adaptation on it (prequential)."""
    x, y = batch[:, :-1], batch[:, 1:]
    with torch.no_grad():
        logits = s.model(x)
        nll = model_mod.next_byte_loss(logits, y, reduction="sum")
    s.router.stage(for_update=update)  # host copies complete with the loss read below: one sync a step
    return float(nll), y.numel()


def update_router(s: Serving, clock: StepClock, update: bool, sample, latency_ms: float,
                   task_loss: float) -> tuple[dict, bool]:
    """(the TTHA loss terms, whether the update was exposed). The adapter update is host work: while the GPU
    runs the TTT step just queued it costs the step nothing. It counts as exposed unless the GPU is still
    busy when it ends (no TTT: always exposed)."""
    queued = gpu_marker(s.device)
    with clock.timed("ttha"):
        terms = s.router.update_ttha(sample, latency_ms, task_loss) if update else {}
    return terms, queued is None or queued.query()


def ttt_step(s: Serving, run_clock: RunClock, clock: StepClock, batch: torch.Tensor, sample, latency_ms: float,
             step: int) -> tuple[str, str]:
    """The TTT policy's decision on batch [B, S+1] and its step: (mode, reason). step is the measured batch's
    index, negative in warm-up. Warm-up trains nothing: its decisions would follow telemetry nobody records (the
    GPU still starting), so two runs would enter the measured phase with different models. On a GPU's wall clock
    the policy learns what a step costs this model here: each mode is timed on the last warm-up batch (not
    applied; its kernels are compiled and tuned there, where a first TTT step in the measured phase would stall
    serving for seconds), then every step taken is."""
    measure = s.device.type == "cuda" and not run_clock.simulated and s.policy.policy != "never"
    if step < 0:
        if measure and step == -1:
            for mode in ("full", "light"):
                seconds = s.trainer.time_step(batch, mode)
                if seconds is not None:
                    s.policy.observe(mode, seconds * 1000.0)
        return "skip", "warm-up"
    mode, reason = s.policy.decide(sample, batch[:, 1:].numel(), latency_ms)
    with clock.timed("ttt"):
        s.trainer.step(batch, mode)
    if measure and mode != "skip":
        s.policy.observe(mode, clock.span["ttt"] * 1000.0)
    return mode, reason


def shared_columns(s: Serving, sample, energy_j: float, usage) -> dict:
    """The columns a step's record takes from telemetry and the router: every step of a decode replay shares
    them, so they are built once a replay (its host time follows the replay's sync, with the GPU idle)."""
    return {"telemetry/power_w": sample.power_w, "telemetry/temp_c": sample.temp_c,
            "telemetry/util_pct": sample.util_pct, "telemetry/sm_clock_mhz": sample.sm_clock_mhz,
            "telemetry/energy_j": energy_j, "router/balance_score": s.router.balance_score,
            **s.router.bias_columns(), **{f"experts/usage_{e}": float(u) for e, u in enumerate(usage)}}


def record(s: Serving, clock: StepClock, rows: list[dict], row: dict, shared: dict, terms: dict) -> None:
    """Completes a step's record with the columns every workload shares (shared_columns) and its loss terms,
    keeps it for steps.csv and the plots, and hands its numbers to the tracker (which batches them)."""
    row.update(shared)
    row.update({f"loss/{k}": float(v) for k, v in terms.items()})
    rows.append(row)
    with clock.timed("log"):
        s.tracker.log_step(row["step"], {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"})


def serve(s: Serving) -> tuple[list[dict], dict]:
    """The test-time phase: each batch is evaluated, routed with the current biases, maybe trained on (TTT),
    and the router learns from it. Returns the per-step records and the summary metrics."""
    cfg = s.cfg
    B, S = int(cfg.test.batch_size), int(cfg.test.seq_len)
    tokens = B * S
    n_warm, n_meas = int(cfg.test.warmup_batches), int(cfg.test.n_batches)
    adaptive = bool(cfg.router.adaptive)
    update_every = int(cfg.router.get("update_every", 1))
    run_clock, clock = RunClock(s.monitor), StepClock()
    pacer = Pacer(run_clock, arrival_interval(cfg.workload, tokens))

    rows: list[dict] = []
    nll_sum, ntok, latency_ms = 0.0, 0, 0.0
    energy0 = t_meas0 = wall0 = read_energy0 = None
    batches = data.stream_batches(s.corpus.test, B, S, n_warm + n_meas)
    bar = tqdm(batches, total=n_warm + n_meas, desc="test-time phase", unit="batch", dynamic_ncols=True,
               mininterval=pretrain.progress_interval())
    for i, batch in enumerate(bar):
        step = i - n_warm
        if i == n_warm:  # warm-up done: stress starts, the clock and energy counter are read
            s.stressor.start()
            pacer.restart()
            energy0, t_meas0, wall0 = s.monitor.energy_j(), run_clock.now(), time.perf_counter()
            read_energy0 = s.monitor.latest().energy_j  # the rows' energy counts from the reading at the start
        arrival = pacer.wait(step) if step >= 0 else run_clock.now()
        clock.start()
        with clock.timed("telemetry"):
            sample = s.monitor.latest()
        batch = batch.to(s.device, non_blocking=True)

        with clock.timed("bias"):
            s.router.begin_step(sample, latency_ms)
        update = adaptive and i % update_every == 0
        nll, n = _evaluate(s, batch, update)
        clock.mark("serve")

        mode, reason = ttt_step(s, run_clock, clock, batch, sample, latency_ms, step)
        terms, exposed = update_router(s, clock, update, sample, latency_ms, nll / n)

        if s.device.type == "cuda":
            torch.cuda.synchronize(s.device)
        usage = usage_array(s.router, s.sim_work.n_experts)
        if run_clock.simulated:  # the simulated GPU serves the batch, then trains on it
            run_clock.busy(*s.sim_work.serve(usage))
            run_clock.busy(*s.sim_work.ttt(mode))
        t_end = run_clock.now()
        latency_ms = (t_end - arrival) * 1000.0  # queueing included when paced
        if step < 0:
            continue

        nll_sum, ntok = nll_sum + nll, ntok + n
        row = {"step": step, "t": t_end - t_meas0, "latency_ms": latency_ms, "ttt/reason": reason,
               "ttt/mode": TTT_CODE[mode], "eval/batch_loss": nll / n, "eval/energy_j": s.monitor.energy_j() - energy0}
        record(s, clock, rows, row, shared_columns(s, sample, sample.energy_j - read_energy0, usage), terms)
        clock.count(exposed)
        bar.set_postfix(power=f"{sample.power_w:.0f}W", temp=f"{sample.temp_c:.0f}C", ttt=mode, refresh=False)

    elapsed, wall = run_clock.now() - t_meas0, time.perf_counter() - wall0
    return rows, summarize(s, rows, nll_sum, ntok, (elapsed, wall), clock)


def summarize(s: Serving, rows: list[dict], nll_sum: float, ntok: int, seconds: tuple[float, float],
              clock: StepClock) -> dict:
    """The run's summary metrics from its measured steps. seconds = (on the run's clock, on the wall clock):
    under sim telemetry tokens/s is in simulated seconds, like every hardware metric; the wall-clock rate (the
    host's speed) is reported beside it and feeds no decision."""
    power = np.array([r["telemetry/power_w"] for r in rows])
    temp = np.array([r["telemetry/temp_c"] for r in rows])
    latency = np.array([r["latency_ms"] for r in rows])
    modes = [r["ttt/mode"] for r in rows if "ttt/mode" in r]  # decode: one TTT decision per finished sequence
    summary = {
        "eval/perplexity": math.exp(nll_sum / max(ntok, 1)),
        "eval/tokens_per_s": ntok / max(seconds[0], 1e-12),
        "eval/wall_tokens_per_s": ntok / max(seconds[1], 1e-12),
        "eval/energy_per_token_j": rows[-1]["eval/energy_j"] / max(ntok, 1),  # the run's energy at its end
        "eval/mean_power_w": float(power.mean()),
        "eval/max_temp_c": float(temp.max()),
        "eval/time_over_power_target_frac": float((power > s.cfg.targets.power_w).mean()),
        "eval/time_over_temp_target_frac": float((temp > s.cfg.targets.temp_c).mean()),
        "eval/mean_latency_ms": float(np.mean(latency)),
        "eval/p50_latency_ms": float(np.percentile(latency, 50)),
        "eval/p99_latency_ms": float(np.percentile(latency, 99)),
        "ttt/skip_frac": modes.count(TTT_CODE["skip"]) / max(len(modes), 1),
        "ttt/light_frac": modes.count(TTT_CODE["light"]) / max(len(modes), 1),
        "overhead/telemetry_frac": clock.fraction("telemetry"),
        "overhead/logging_frac": clock.fraction("log"),
        "overhead/ttha_update_frac": clock.fraction("ttha_exposed"),
        "overhead/ttt_frac": clock.fraction("ttt"),
        "overhead/ttha_host_frac": clock.fraction("ttha"),
        "overhead/router_bias_frac": clock.fraction("bias"),
        "telemetry/read_errors": float(getattr(s.monitor, "error_count", 0)),
    }
    summary.update(late_half(rows, ntok))
    for e in range(s.sim_work.n_experts):
        summary[f"experts/mean_usage_{e}"] = float(np.mean([r[f"experts/usage_{e}"] for r in rows]))
    for key in sorted({k for k in rows[0] if k.startswith("experts/activated_")}):  # decode
        summary[key.replace("experts/", "experts/mean_")] = float(np.mean([r[key] for r in rows]))
    return summary


def late_half(rows: list[dict], ntok: int) -> dict:
    """Perplexity, mean power and energy per token over the records' second half. By then TTHA's adapter has
    learned, and every router serves the same bytes there: its settled trade-off, apart from the transient of its
    learning, which the whole-run metrics include. Every record covers the same number of tokens; eval/energy_j is
    the run's energy when a record's step ended."""
    h = len(rows) // 2
    if h == 0:
        return {}
    late, tokens = rows[h:], ntok * (len(rows) - h) / len(rows)
    energy = late[-1]["eval/energy_j"] - rows[h - 1]["eval/energy_j"]
    return {"eval/late_perplexity": math.exp(float(np.mean([r["eval/batch_loss"] for r in late]))),
            "eval/late_mean_power_w": float(np.mean([r["telemetry/power_w"] for r in late])),
            "eval/late_energy_per_token_j": energy / max(tokens, 1)}
