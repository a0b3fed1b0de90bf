"""Pipeline efficiency with simulated engines and a simulated trainer: async step time vs the ideal and vs synchronous.

The system under test is the real RolloutManager + ZMQ transport + RolloutBuffer; only the engines (latency model:
`capacity` concurrent requests per engine, `per_token_s` per generated token, jittered; see pipeline/testing/rollout_sim.py)
and the trainer (`train_s` per step, `sync_s` per weight sync) sleep. For max_staleness s = 0 (exactly
synchronous), 1 and 2 it measures the mean step time after a warm-up and compares it with
- ideal = max(generation, training) per step, where generation = the engine time the step's share of generated
  tokens needs at full saturation (kept batch + the groups dynamic sampling filtered + work wasted at updates),
  i.e. tokens * per_token_s / (engines * capacity), and training = train_s + sync_s;
- synchronous = the measured s = 0 step time (and the ideal synchronous sum generation + training, the reference
  of s = 0 itself: `<regime>_s0_over_sync_sum_ratio`; the <= 1.1 target is for s >= 1).
Two regimes: balanced (training = generation) and generation-bound (training = generation / 2); training is sized
by a 4-step s = 0 probe run with over-admission off (the same whatever the policy under test), which comes out
~1.15x the generation measured in the long runs, so "balanced" is slightly training-bound. The trainer makes
MINIBATCHES = 4 updates per step, as the presets do, and streams them (pipeline.config.Layout.stream_parts): it takes the
step's batch in 4 parts and spends train_s / 4 on each as soon as it is in. Headlines per regime and s:
`<regime>_s<s>_over_ideal_ratio` (target <= 1.1) and `<regime>_s<s>_speedup_over_sync_ratio`; the balanced regime
also runs one mini-batch per step (nothing to stream): `balanced_s<s>_one_minibatch_over_ideal_ratio`.
The engines are `FastTokenEngines` (see there): the base simulator's per-token hashing ran on the manager's event
loop and made the benchmark measure the simulator (s=2 balanced 1.16 -> 1.05-1.11 with it replaced).
Measured (shared 2-core VM, 2 runs, rollout.partial_rollout = resume): async/ideal balanced s=1 1.05 / 1.05, s=2
1.04 / 1.05; gen-bound s=1 1.00 / 1.01, s=2 1.00 / 1.01; s = 0 over the synchronous sum: balanced 0.89 / 0.89 (the
trainer trains a step's first mini-batches while its last groups generate, on-policy still), gen-bound 1.01 / 1.01;
speedup over that s = 0: x1.54-1.58. One mini-batch per step: balanced s=1 1.12 / 1.17, s=2 1.04 / 1.06 (speedups
x1.89-2.13 over a slower s = 0). Other modes, balanced, 4 mini-batches: wait s=1 1.19 / 1.20, s=2 1.24 / 1.25;
abort s=1 1.26 / 1.30, s=2 1.26 / 1.27 (abort throws away ~30% of the tokens).
Why one mini-batch per step misses at balanced s = 1: under the bound, batch k+2 may only start generating once
version k is live, so each batch -- tail of its slowest group included -- must be generated within one training
step, and the update window (sync_s plus abort/resume, ~5%) idles all engines. Streaming lets a step start on its
first quarter, so the tail of its last groups overlaps three quarters of its training. Over-admission
(pipeline/flow/admission.py; `--over-admission 0` is the conservative rule that counted every unfinished group as kept)
fills engine slots near the bound at the cost of some wasted tokens (over-admitted groups that lose the race for a
batch are re-queued). `--no-dynamic-sampling` (nothing to over-admit, training ~ generation; 1 run): balanced s=1 1.08, s=2 1.07;
gen-bound 1.06 / 1.05; one mini-batch per step: balanced s=1 1.28, s=2 1.04.

    .venv/bin/python -m benchmarks.bench_pipeline [--quick] [--over-admission X] [--no-dynamic-sampling]
        [--minibatches N]
"""

from __future__ import annotations

import argparse
import json
import logging

import numpy as np

from pipeline.testing.rollout_sim import SimEngineClient, _h, run_sim, sim_config, sim_prompts

ENGINES, CAPACITY, PER_TOKEN_S = 2, 16, 0.0005
MIN_LEN, MAX_LEN, MAX_NEW = 32, 400, 384  # some responses hit max_new_tokens (truncated)
BATCH, GROUP = 8, 8
MINIBATCHES = 4  # optimizer updates per step, as the presets (configs/*: 4; the DAPO paper's 16), streamed


class FastTokenEngines(SimEngineClient):
    """The simulated engines with cheap token synthesis. The base class derives every token from a blake2b hash of
    (seed, key, position), ~8 us of Python per token, and runs it on the manager's event loop thread (the engines
    are coroutines there): at ~1.6k tokens per simulated engine-second that took most of a core and showed up as
    dispatch latency and slow aborts (before_weight_update 30+ ms instead of ~2), i.e. the benchmark measured the
    simulator. Real engines make their tokens in their own processes. Here a sample's tokens past position 0 come
    from one numpy draw per sample key, cached, so a resumed request still continues exactly the same tokens;
    position 0 (correct / wrong) and the response lengths are the base class's, so the workload is unchanged."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._tokens: dict[str, list[int]] = {}

    def token(self, key: str, pos: int, prompt_ids: list[int]) -> int:
        if pos == 0:
            return super().token(key, pos, prompt_ids)
        ids = self._tokens.get(key)
        if ids is None:
            if len(self._tokens) > 4096:  # bounded: a finished sample is not asked for again
                self._tokens.clear()
            rng = np.random.default_rng(_h(self.seed, "tok", key))
            ids = self._tokens[key] = rng.integers(5, 200, size=self.max_len + 1).tolist()
        return ids[pos]


def one_run(
    s: int,
    mode: str,
    steps: int,
    warmup: int,
    train_s: float,
    sync_s: float,
    over_admission: float | None = None,
    dynamic_sampling: bool = True,
    minibatches: int = 1,
) -> dict[str, float]:
    cfg = sim_config(
        num_minibatches=minibatches,
        max_staleness=s,
        partial_rollout=mode,
        batch_size=BATCH,
        max_inflight_per_engine=CAPACITY,
        max_new_tokens=MAX_NEW,
        n_samples_per_prompt=GROUP,
        dynamic_sampling=dynamic_sampling,
    )
    if over_admission is not None:
        cfg.rollout.over_admission = over_admission
    client = FastTokenEngines(
        n_engines=ENGINES,
        capacity=CAPACITY,
        per_token_s=PER_TOKEN_S,
        jitter=0.2,
        min_len=MIN_LEN,
        max_len=MAX_LEN,
        p_always_right=0.1,
        p_always_wrong=0.1,
        seed=7,
    )
    res = run_sim(cfg, client, sim_prompts(2000, seed=3), steps=steps, train_s=train_s, sync_s=sync_s, timeout_s=60)
    measured = sum(res.step_s[warmup:]) / (steps - warmup)
    tokens = res.rollout_stats["rollout/tokens"]  # every token the engines made
    wasted = res.rollout_stats.get("rollout/wasted_tokens", 0.0)  # thrown away by aborts: not part of the ideal
    gen = (tokens - wasted) * PER_TOKEN_S / (ENGINES * CAPACITY) / steps
    ideal = max(gen, train_s + sync_s)
    stale = [
        v - smp.min_version for v, b in zip(res.versions, res.trained, strict=True) for g in b for smp in g.samples
    ]
    return {
        "step_s": measured,
        "generation_s": gen,
        "training_s": train_s + sync_s,
        "ideal_s": ideal,
        "ideal_sync_s": gen + train_s + sync_s,
        "over_ideal": measured / ideal,
        "staleness_max": float(max(stale)),
        "engine_utilisation": client.busy_s / (res.wall_s * ENGINES * CAPACITY),
        "kept_frac": res.buffer_metrics["filter/kept"] / max(res.buffer_metrics["buffer/received"], 1),
        "wasted_tokens_frac": wasted / max(tokens, 1),
    }


def run(
    quick: bool = False,
    over_admission: float | None = None,
    dynamic_sampling: bool = True,
    minibatches: int = MINIBATCHES,
) -> dict:
    """`over_admission`: rollout.over_admission for every run (None: the config default); `minibatches`: streamed
    updates per step of the headline runs."""
    logging.getLogger("pipeline").setLevel(logging.ERROR)
    steps, warmup = (10, 2) if quick else (24, 4)
    # one step's generation, to size the trainer; the same whatever the admission policy under test
    probe = one_run(0, "resume", 4, 1, 0.0, 0.0, over_admission=0.0, dynamic_sampling=dynamic_sampling)
    gen = probe["generation_s"]
    # balanced (training = generation: the hardest case for s=1) and generation-bound (training = generation / 2)
    scenarios = [("balanced", 1.0)] + ([] if quick else [("gen_bound", 0.5)])
    out: dict = {"generation_probe_s": gen, "minibatches": minibatches}
    for name, frac in scenarios:
        train_s, sync_s = 0.95 * frac * gen, 0.05 * frac * gen
        runs = [(0, "resume", minibatches), (1, "resume", minibatches), (2, "resume", minibatches)]
        if not quick and name == "balanced":
            runs += [(s, mode, minibatches) for s in (1, 2) for mode in ("wait", "abort")]
            if minibatches > 1:  # one update per step: nothing streamed
                runs += [(0, "resume", 1), (1, "resume", 1), (2, "resume", 1)]
        for s, mode, mb in runs:
            r = one_run(s, mode, steps, warmup, train_s, sync_s, over_admission, dynamic_sampling, mb)
            out[f"{name}_s{s}_{mode}" + ("" if mb == minibatches else f"_{mb}mb")] = r
            print(
                f"[pipeline] {name:9s} s={s} {mode:6s} {mb} mb: step {r['step_s'] * 1e3:6.1f} ms; ideal max(gen "
                f"{r['generation_s'] * 1e3:.0f}, train {r['training_s'] * 1e3:.0f}) = {r['ideal_s'] * 1e3:.0f} ms -> "
                f"x{r['over_ideal']:.2f}; sync sum {r['ideal_sync_s'] * 1e3:.0f} ms; engines "
                f"{r['engine_utilisation']:.0%} busy; max staleness {r['staleness_max']:.0f}; wasted tokens "
                f"{r['wasted_tokens_frac']:.1%}",
                flush=True,
            )
        sync = out[f"{name}_s0_resume"]["step_s"]
        # s = 0 is synchronous: its reference is the sum generation + training, not their max
        out[f"{name}_s0_over_sync_sum_ratio"] = sync / out[f"{name}_s0_resume"]["ideal_sync_s"]
        for s in (1, 2):
            out[f"{name}_s{s}_over_ideal_ratio"] = out[f"{name}_s{s}_resume"]["over_ideal"]
            out[f"{name}_s{s}_speedup_over_sync_ratio"] = sync / out[f"{name}_s{s}_resume"]["step_s"]
        print(
            f"[pipeline] {name}: async/ideal s=1 {out[f'{name}_s1_over_ideal_ratio']:.2f}, s=2 "
            f"{out[f'{name}_s2_over_ideal_ratio']:.2f} (target <= 1.1); speedup over synchronous (measured s=0): "
            f"s=1 x{out[f'{name}_s1_speedup_over_sync_ratio']:.2f}, s=2 x{out[f'{name}_s2_speedup_over_sync_ratio']:.2f}; "
            f"s=0 / (generation + training) {out[f'{name}_s0_over_sync_sum_ratio']:.2f}",
            flush=True,
        )
        if f"{name}_s1_resume_1mb" in out:
            whole = {s: out[f"{name}_s{s}_resume_1mb"] for s in (0, 1, 2)}
            for s in (1, 2):
                out[f"{name}_s{s}_one_minibatch_over_ideal_ratio"] = whole[s]["over_ideal"]
            print(
                f"[pipeline] {name}, one mini-batch per step (nothing to stream): async/ideal s=1 "
                f"{whole[1]['over_ideal']:.2f}, s=2 {whole[2]['over_ideal']:.2f}; speedup over its synchronous: "
                f"s=1 x{whole[0]['step_s'] / whole[1]['step_s']:.2f}, s=2 x{whole[0]['step_s'] / whole[2]['step_s']:.2f}",
                flush=True,
            )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--over-admission", type=float, default=None, help="rollout.over_admission (default: config's)")
    ap.add_argument("--no-dynamic-sampling", action="store_true", help="keep every group (nothing to over-admit)")
    ap.add_argument("--minibatches", type=int, default=MINIBATCHES, help="streamed updates per step (1: none)")
    args = ap.parse_args()
    print(json.dumps(run(args.quick, args.over_admission, not args.no_dynamic_sampling, args.minibatches), indent=1))


if __name__ == "__main__":
    main()
