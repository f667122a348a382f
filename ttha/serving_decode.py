"""Decode serving (workload=decode): the test stream served one token per stream per step, as an LLM server decodes.

test.batch_size streams run together through ttha.decode.Decoder (a preallocated KV cache; on a GPU the whole
step is one captured CUDA graph). Teacher-forced: a stream's next input is the true next byte, so the prequential
perplexity covers the same bytes, in the same order, as the batch workloads. The streams advance together; at
test.seq_len they start the next test sequences at position 0, and TTT trains (or not) on the finished ones.

Why decode: a step reads an expert's weights once if it routes it any token and not at all otherwise, so which
experts the router activates sets what the step costs. The router's bias is written into the decoder's device
tensor before each step (a graph is never recaptured), and the adapter learns every router.update_every steps
from the step's gate logits. Under sim telemetry a step costs the simulated GPU the bytes of the experts it
activated (sim.SimWork.decode), so the simulated run shows what routing saves.
"""
from __future__ import annotations

import time

import numpy as np
import torch
from tqdm import tqdm

from ttha import data, pretrain, sim
from ttha.decode import Decoder
from ttha.serving import (TTT_CODE, Pacer, RunClock, Serving, StepClock, record, shared_columns, summarize,
                          ttt_step, update_router, usage_array)

LOG_EVERY = 16  # steps a logged MLflow point averages by default: a decode run serves hundreds of steps a second


def step_interval(workload) -> float:
    """Seconds between decode steps: 0 when saturated (workload.steps_per_s null)."""
    rate = workload.get("steps_per_s")
    return 0.0 if rate is None else 1.0 / float(rate)


def activation_rates(counts: np.ndarray, bits) -> dict[str, float | np.ndarray]:
    """Share of the experts of each precision that got >= 1 token in the step, over the layers: what the step
    read. counts [L, E] gives a float a precision; a replay's counts [n, L, E] give each step's rates [n]."""
    active, bits = np.asarray(counts) > 0, np.asarray(bits)
    return {f"experts/activated_{b}bit": active[..., bits == b].mean((-2, -1)) for b in sorted(set(bits.tolist()))}


def expert_params(cfg) -> float:
    """Weights of one expert the simulated GPU reads per activation: telemetry.sim.decode_expert_params (a
    larger model's experts routed like this one's), else the model's own (2 x d_model x d_ff)."""
    given = (cfg.telemetry.get("sim") or {}).get("decode_expert_params")
    return float(given) if given is not None else 2.0 * int(cfg.model.d_model) * int(cfg.model.d_ff)


def serve(s: Serving) -> tuple[list[dict], dict]:
    """The test-time phase in decode: one record per decode step. Returns the records and the summary metrics.

    The streams advance workload.steps_per_graph steps a replay: telemetry, the router's bias and the host's
    reads happen once per replay; the replay starts when its last step's tokens have arrived (paced), so each
    step's latency runs from its own arrival to the replay's end. The adapter learns from a replay while the
    GPU runs the next one (host work hidden behind it), so a replay's loss terms are logged with the next; the
    run's last replay, which none follows, is not learnt from. The next replay's telemetry and bias are read and
    computed there too, so they lag one replay: its bias reads the latency of the replay before the current one."""
    cfg = s.cfg
    B, S = int(cfg.test.batch_size), int(cfg.test.seq_len)
    n = int(cfg.workload.get("steps_per_graph") or 1)
    n_warm, n_meas = int(cfg.test.warmup_batches), int(cfg.test.n_batches)  # in batches of sequences
    adaptive = bool(cfg.router.adaptive)
    update_every = int(cfg.router.get("update_every", 1))
    run_clock, clock = RunClock(s.monitor), StepClock()
    pacer = Pacer(run_clock, step_interval(cfg.workload))
    decoder = Decoder(s.model, B, max_seq_len=S, steps=n)
    sim_cfg = cfg.telemetry.get("sim") or {}
    power_range = (float(sim_cfg.get("idle_w", sim.IDLE_W)), float(sim_cfg.get("cap_w", sim.CAP_W)))
    per_expert = expert_params(cfg)
    bits = s.router.bits

    rows: list[dict] = []
    nll_sum, ntok, latency_ms, n_steps, learn, routed_by = 0.0, 0, 0.0, 0, None, None
    energy0 = t_meas0 = wall0 = read_energy0 = None
    bar = tqdm(total=(n_warm + n_meas) * S, desc="decode", unit="step", dynamic_ncols=True,
               mininterval=pretrain.progress_interval())
    for i, batch in enumerate(data.stream_batches(s.corpus.test, B, S, n_warm + n_meas)):
        if i == n_warm:  # warm-up done (the graph is captured): stress starts, the clock and energy are read
            s.stressor.start()
            pacer.restart()
            energy0, t_meas0, wall0 = s.monitor.energy_j(), run_clock.now(), time.perf_counter()
            read_energy0 = s.monitor.latest().energy_j
        on_device = batch.to(s.device, non_blocking=True)
        inputs, targets = on_device[:, :-1].t(), on_device[:, 1:].t()  # [S, B]: a row a step
        for p in range(0, S, n):
            first = (i - n_warm) * S + p  # the replay's steps: first .. first + n - 1
            last_arrival = pacer.wait(first + n - 1) if first >= 0 else run_clock.now()
            arrivals = last_arrival - pacer.interval * np.arange(n - 1, -1, -1)
            clock.start()
            if routed_by is None:  # the first replay: nothing ran before it to hide this behind
                with clock.timed("telemetry"):
                    routed_by = (s.monitor.latest(), latency_ms)
            sample = routed_by[0]
            with clock.timed("bias"):
                s.router.begin_step(*routed_by)
                if adaptive:
                    decoder.set_bias(s.router.device_bias)
            update = adaptive and any((n_steps + j) % update_every == 0 for j in range(n))
            positions = torch.arange(p, p + n).unsqueeze(1).expand(n, B)
            nll_t = decoder.run(inputs[p:p + n], positions, targets[p:p + n])
            # while the GPU runs the replay, the adapter learns from the one before (its records are staged), then
            # the next replay's bias is computed from the readings at hand
            terms, exposed = update_router(s, clock, *learn) if learn else ({}, True)
            learn = (update, *routed_by)  # the readings this replay was routed under (its loss follows the sync)
            with clock.timed("telemetry"):
                routed_by = (s.monitor.latest(), latency_ms)  # the next replay's: the latency of the one before
            with clock.timed("bias"):
                s.router.prepare_bias(*routed_by)
            s.router.record_decode(decoder.gate_logits, decoder.step_counts.sum(0))  # the last step's gate
            s.router.stage(for_update=update)
            nll = nll_t.tolist()  # the replay's one sync: its losses, counts and staged records are then here
            counts = decoder.step_counts.cpu().numpy()
            clock.mark("serve")
            learn = (*learn, sum(nll) / (n * B))  # what this replay was routed under, and its loss

            row = {}
            if p + n == S:  # the streams' sequences are done: train on them (or not) before the next ones
                mode, reason = ttt_step(s, run_clock, clock, on_device, sample, latency_ms, i - n_warm)
                row = {"ttt/mode": TTT_CODE[mode], "ttt/reason": reason}
            if s.device.type == "cuda":
                torch.cuda.synchronize(s.device)
            usage = usage_array(s.router, s.sim_work.n_experts)
            if run_clock.simulated:  # the simulated GPU reads each step's activated experts, then trains
                for c in counts:
                    run_clock.busy(*s.sim_work.decode(c, per_expert, *power_range))
                if "ttt/mode" in row:
                    run_clock.busy(*s.sim_work.ttt(mode))
            t_end = run_clock.now()
            latencies = (t_end - arrivals) * 1000.0  # queueing included when paced
            latency_ms = float(latencies.mean())  # the replay's steps' mean: what the next bias reads
            n_steps += n
            bar.update(n)
            if first < 0:
                continue

            rates = activation_rates(counts, bits)  # [n] a precision: the replay's steps at once
            shared = shared_columns(s, sample, sample.energy_j - read_energy0, usage)
            energy_j = s.monitor.energy_j() - energy0  # the run's energy when the replay ended
            for j in range(n):  # a record per step; the replay's TTT decision and loss terms on its last
                nll_sum, ntok = nll_sum + nll[j], ntok + B
                step_row = {"step": first + j, "t": t_end - t_meas0, "latency_ms": float(latencies[j]),
                            "eval/batch_loss": nll[j] / B, "eval/energy_j": energy_j,
                            **{k: float(v[j]) for k, v in rates.items()},
                            **(row if j == n - 1 else {})}
                record(s, clock, rows, step_row, shared, terms if j == n - 1 else {})
            clock.count(exposed)
            if n_steps % 16 < n:
                bar.set_postfix(power=f"{sample.power_w:.0f}W", temp=f"{sample.temp_c:.0f}C", refresh=False)
    bar.close()

    elapsed, wall = run_clock.now() - t_meas0, time.perf_counter() - wall0
    return rows, summarize(s, rows, nll_sum, ntok, (elapsed, wall), clock)
