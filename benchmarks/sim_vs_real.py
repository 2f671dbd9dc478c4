"""The simulator against the real server, on this machine: the same `bench --compare` experiment
run as `adrenaline bench` (a fresh `adrenaline serve` per policy, rates in turn) and as
`adrenaline simulate` (the CPU as `adrenaline profile` measured it, every role sharing its
cores), then output throughput, median TPOT and median TTFT side by side with the relative
error (targets: 15%, 15%, 25%).

Other jobs share this machine: each real run measures the cores they used meanwhile (the
machine's busy time in /proc/stat less the deployment's and this process's), and the simulation
of that run leaves them those cores.

    .venv/bin/python benchmarks/sim_vs_real.py [--rates 10,inf] [--num-prompts 200]
        [--policies none,load-aware] [--profile FILE] [--output results/sim_vs_real.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import httpx

from scheduler.cost_model import CostModel
from server.bench.client import (
    arrival_times,
    benchmark,
    build_lengths,
    build_requests,
    request_body,
)
from server.bench.metrics import aggregate
from server.cli import build_parser
from server.launch.serve_process import ServeProcess
from server.simulate.cli import simulate_rate
from server.simulate.cluster import Workload
from server.simulate.deployment import build, hardware, parse_serve_args

# Decode KV capped (256 blocks of 16 tokens, as benchmarks/README's policy comparison) so that
# offloading matters; the executor's pool is four times larger.
SERVE = "--model tiny --num-kv-blocks 256 --offload-blocks 1024"
TIMES = ("decode", "attention", "prefill", "offloaded", "exchange")  # a profile's fitted times
TARGETS = {"output_throughput": 0.15, "median_tpot_ms": 0.15, "median_ttft_ms": 0.25}


def profile(path: Path, quick: bool = False) -> float:
    """`adrenaline profile` as a worker of `serve` runs: one torch thread (2 cores, 2 workers).
    Returns the runnable processes other jobs kept meanwhile: its times are wall-clock, so they
    include its share of the cores against them."""
    adrenaline = Path(sys.executable).parent / "adrenaline"
    proc = subprocess.Popen([str(adrenaline), "profile", "--model", "tiny", "--torch-threads",
                             "1", "--output", str(path), "--log-level", "WARNING",
                             *(["--quick"] if quick else [])])  # fmt: skip
    with Background({proc.pid}) as background:
        if proc.wait() != 0:
            raise RuntimeError(f"adrenaline profile exited with {proc.returncode}")
    return background.competitors


def profiled(path: Path, quick: bool) -> dict:
    """A profile taken now, as a real run's record keeps it: the model, and the runnable
    processes other jobs kept while it ran."""
    competitors = profile(path, quick)
    return {"model": json.loads(path.read_text()), "competitors": competitors}


def during(run: dict, cores: float) -> CostModel | None:
    """The step costs while a real run ran: the mean of the profiles taken just before and just
    after it (of each repeat), each on a core of its own. This machine's speed drifts (a profile
    took 2.2 times as long as one an hour before it), so one profile taken before every run is
    off by as much. None for runs recorded before these profiles were."""
    if not run.get("profiles"):
        return None
    models = [alone(CostModel.from_json(p["model"]), p["competitors"], cores)
              for p in run["profiles"]]  # fmt: skip

    def mean(field: str) -> tuple[float, ...]:
        return tuple(statistics.fmean(c) for c in zip(*(getattr(m, field) for m in models)))

    return replace(models[0], **{field: mean(field) for field in TIMES})


def alone(model: CostModel, competitors: float | None, cores: float) -> CostModel:
    """The profile's times on a core of its own: under fair sharing with `competitors` other
    runnable processes it ran at min(1, cores / (1 + competitors)) of a core."""
    if not competitors:
        return model
    speed = min(1.0, cores / (1.0 + competitors))

    def scaled(coefficients):
        return tuple(c * speed for c in coefficients)

    return replace(model, **{field: scaled(getattr(model, field)) for field in TIMES})


# What the machine does meanwhile ----------------------------------------------------------------


def _stat(path: str) -> list[str] | None:
    """A /proc stat file's fields after the command name (None once the process is gone)."""
    try:
        return Path(path).read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _pids() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def _descendants(pid: int) -> set[int]:
    parents = {p: int(fields[1]) for p in _pids() if (fields := _stat(f"/proc/{p}/stat"))}
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _ticks(fields: list[str] | None) -> int:
    return int(fields[11]) + int(fields[12]) if fields else 0


def _cpu_seconds(pid: int) -> float:
    return _ticks(_stat(f"/proc/{pid}/stat")) / os.sysconf("SC_CLK_TCK")


def _machine_busy_seconds() -> float:
    """Core-seconds every process on the machine has used (/proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _cpu_ticks() -> dict[int, int]:
    """Every process's CPU time so far, in clock ticks."""
    return {p: _ticks(fields) for p in _pids() if (fields := _stat(f"/proc/{p}/stat"))}


def _running_threads(pid: int) -> int:
    """Threads of `pid` runnable now (a process's own state is its main thread's alone)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    states = (_stat(f"/proc/{pid}/task/{tid}/stat") for tid in tasks)
    return sum(1 for fields in states if fields and fields[0] == "R")


class Sampler:
    """Calls sample() every SAMPLE_S on a thread of its own while the `with` block runs; what it
    returns, unless None, is kept in `samples`."""

    SAMPLE_S = 1.0

    def __init__(self) -> None:
        self.samples: list = []
        self._stop = threading.Event()

    def sample(self):
        raise NotImplementedError

    def _loop(self) -> None:
        while not self._stop.wait(self.SAMPLE_S):
            value = self.sample()
            if value is not None:
                self.samples.append(value)

    def __enter__(self):
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


class Background(Sampler):
    """What other jobs did while the benchmark ran: the cores they used (the machine's busy time
    less that of the deployment's processes and of this one), and the threads they kept
    runnable, counted every SAMPLE_S among the processes that used the CPU within REFRESH_S.

    Counted, not inferred: the machine's runnable threads (procs_running) less ours, read a
    moment apart while ours wake and sleep every millisecond, came out 0.3 to 0.8 on a quiet
    machine where a scan of every thread found 0.03."""

    SAMPLE_S = 0.02
    REFRESH_S = 1.0

    def __init__(self, ours: set[int]) -> None:
        super().__init__()
        self.ours = ours | {os.getpid()}
        self._ticks: dict[int, int] = {}
        self._active: list[int] = []
        self._refresh_at = 0.0

    def _refresh(self) -> None:
        """The other processes that used the CPU since the last refresh (a full scan of /proc
        each sample would cost a fifth of a core)."""
        ticks = _cpu_ticks()
        self._active = [pid for pid, t in ticks.items()
                        if pid not in self.ours and t > self._ticks.get(pid, t)]  # fmt: skip
        self._ticks = ticks
        self._refresh_at = time.perf_counter() + self.REFRESH_S

    def sample(self) -> int:
        if time.perf_counter() >= self._refresh_at:
            self._refresh()
        return sum(_running_threads(pid) for pid in self._active)

    def _ours(self) -> float:
        return sum(_cpu_seconds(pid) for pid in self.ours)

    def __enter__(self) -> Background:
        self.started = time.perf_counter()
        self.machine, self.deployment = _machine_busy_seconds(), self._ours()
        self._ticks = _cpu_ticks()
        self._refresh_at = self.started + self.SAMPLE_S  # the first sample finds the active
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        elapsed = time.perf_counter() - self.started
        ours = self._ours() - self.deployment
        self.ours_cores = ours / elapsed
        self.cores = max(0.0, (_machine_busy_seconds() - self.machine - ours) / elapsed)
        self.competitors = sum(self.samples) / max(1, len(self.samples))


class Gauges(Sampler):
    """The deployment's own account of a run: its /metrics gauges (moving averages the workers
    heartbeat) sampled every SAMPLE_S while the decode worker is busy, then averaged. It says
    where a miss comes from: the batch, the share offloaded, the executor's layer, the wait."""

    SAMPLE_S = 0.25
    NAMES = {
        'adrenaline:decode_batch_size{instance="decode-0",role="decode"}': "decode_batch",
        'adrenaline:num_requests_running{instance="attention-0",role="attention"}': "offloaded",
        'adrenaline:step_time_seconds{instance="decode-0",role="decode"}': "decode_step_ms",
        'adrenaline:executor_attention_time_seconds{instance="attention-0",role="attention"}':
            "executor_layer_ms",
        'adrenaline:offload_roundtrip_seconds{instance="decode-0",role="decode"}':
            "layer_wait_ms",
    }  # fmt: skip

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url

    def __enter__(self) -> Gauges:
        self._client = httpx.Client(timeout=5)
        return super().__enter__()

    def sample(self) -> dict[str, float] | None:
        try:
            text = self._client.get(f"{self.url}/metrics").text
        except httpx.HTTPError:
            return None
        found = {}
        for line in text.splitlines():
            name, _, value = line.rpartition(" ")
            if name in self.NAMES:
                scale = 1000 if self.NAMES[name].endswith("_ms") else 1
                found[self.NAMES[name]] = float(value) * scale
        return found if found.get("decode_batch") else None

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        self._client.close()

    def means(self) -> dict[str, float]:
        return gauge_means(self.samples)


def gauge_means(samples: list[dict[str, float]]) -> dict[str, float]:
    """Each gauge's mean over the samples (0 where none was seen)."""
    n = max(1, len(samples))
    return {k: round(sum(s.get(k, 0.0) for s in samples) / n, 3)
            for k in sorted(set(Gauges.NAMES.values()))}  # fmt: skip


# The two runs -----------------------------------------------------------------------------------


def bench_args(args, profile_path: Path) -> argparse.Namespace:
    return build_parser().parse_args([
        "simulate", "--num-prompts", str(args.num_prompts), "--max-input-len", "512",
        "--max-output-len", "128", "--seed", "0", "--serve-args", SERVE,
        "--profile", str(profile_path), *args.sim_args.split(),
    ])  # fmt: skip


def real_runs(
    args, bargs, profile_path: Path, policy: str, rates: list[float], quick: bool = False
) -> list[dict]:
    """One run per rate on a fresh deployment, with a profile of the machine taken between
    runs (the deployment idle) so that each run's simulation gets the speed it ran at."""
    flags = ["--offload-policy", policy, "--log-level", "WARNING", *SERVE.split(),
             "--profile", str(profile_path)]  # fmt: skip
    server = ServeProcess(flags, startup_timeout=600.0)
    try:
        ours = _descendants(server.proc.pid) | {server.proc.pid}
        model = httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"][0]["id"]
        requests = build_requests(bargs)
        bodies = [request_body("/v1/completions", model, r, True) for r in requests]
        now = profile_path.with_suffix(".now.json")
        between, rows = [profiled(now, quick)], []
        for rate in rates:
            offsets = arrival_times(len(requests), rate, bargs.seed)
            with Background(ours) as background, Gauges(server.url) as gauges:
                records, duration = asyncio.run(benchmark(
                    server.url + "/v1/completions", bodies, [r.prompt_len for r in requests],
                    offsets, None, 3600.0, show_progress=False,
                ))  # fmt: skip
            between.append(profiled(now, quick))
            row = aggregate(records, duration)
            row.update(request_rate=rate, background_cores=background.cores,
                       deployment_cores=background.ours_cores,
                       competitors=background.competitors, gauges=gauges.means(),
                       profiles=between[-2:])  # fmt: skip
            rows.append(row)
        return rows
    finally:
        server.stop()


def simulated_runs(
    bargs, policy: str, real: list[dict], profile_competitors: float | None = None
) -> list[dict]:
    serve = parse_serve_args(f"{SERVE} --profile {bargs.profile}", policy)
    hw = hardware(bargs, serve)
    # The steps' own cost, without the other jobs of the profiling run; the router's policy
    # still gets the profile as measured, as the real router does.
    cores = float(os.cpu_count() or 1)
    first = alone(hw.cost.model, profile_competitors, cores)
    sim, _ = build(bargs, serve, hw)
    workload = Workload(*build_lengths(bargs), [])
    rows = []
    for r in real:
        hw.cost.model = during(r, cores) or first
        # The other jobs of that real run: their runnable processes share the cores fairly
        # with ours (runs recorded before that was measured: the cores they used).
        if r.get("competitors") is not None:
            sim.cpu.background, sim.cpu.competitors = 0.0, r["competitors"]
        else:
            sim.cpu.background = r["background_cores"]
        with SimGauges(sim) as gauges:
            row = simulate_rate(sim, hw, workload, r["request_rate"], bargs)
        row.pop("_requests")
        row["gauges"] = gauges.means()
        # How far the machine's speed had moved since the first profile (a 4-row decode step).
        row["drift"] = hw.cost.model.decode_step_ms(4, 2048) / first.decode_step_ms(4, 2048)
        rows.append(row)
    return rows


class SimGauges:
    """Gauges' figures from the simulated workers' heartbeats, the ones the router reads."""

    def __init__(self, sim) -> None:
        self.sim, self._latest = sim, {}
        self.samples: list[dict[str, float]] = []

    def means(self) -> dict[str, float]:
        return gauge_means(self.samples)

    def __enter__(self) -> SimGauges:
        meter = self.sim.meter
        self._heartbeat, meter.heartbeat = meter.heartbeat, self._on_heartbeat
        return self

    def __exit__(self, *exc) -> None:
        self.sim.meter.heartbeat = self._heartbeat

    def _on_heartbeat(self, sim, process, stats) -> None:
        self._heartbeat(sim, process, stats)
        if process.role == "attention":
            self._latest.update(offloaded=stats.num_running,
                                executor_layer_ms=stats.attention_time_ms)  # fmt: skip
        elif process.role == "decode":
            self._latest.update(decode_batch=stats.last_batch_size,
                                decode_step_ms=stats.step_time_ms,
                                layer_wait_ms=stats.offload_roundtrip_ms)  # fmt: skip
            if stats.last_batch_size:
                self.samples.append(dict(self._latest))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rates", default="10,inf")
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--policies", default="none,load-aware")
    p.add_argument("--profile", type=Path, default=None, help="reuse a profile of this machine")
    p.add_argument("--sim-args", default="", help="extra simulate flags, e.g. --sim-hop-ms 0.3")
    p.add_argument("--output", default="results/sim_vs_real.json")
    p.add_argument("--repeats", type=int, default=3, help="real runs of each cell (median)")
    p.add_argument(
        "--resimulate",
        type=Path,
        default=None,
        metavar="FILE",
        help="keep the real runs (and profile) of an earlier output; simulate again",
    )
    args = p.parse_args()
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    earlier = json.loads(args.resimulate.read_text()) if args.resimulate else None
    profile_path = args.profile or out.with_suffix(".profile.json")
    profile_competitors = None
    if earlier is not None:
        profile_path.write_text(json.dumps(earlier["profile"]))
        profile_competitors = earlier.get("profile_competitors")
    elif args.profile is None:
        profile_competitors = profile(profile_path)
    bargs = bench_args(args, profile_path)
    rates = [float(r) for r in args.rates.split(",")]
    rows, real, sim = [], {}, {}
    for policy in args.policies.split(","):
        if earlier is not None and policy in earlier["real"]:
            real[policy] = earlier["real"][policy]
        else:
            # Each repeat on a fresh deployment: one run of a cell varies by a fifth or more
            # between repeats here, so the simulation is held to their median.
            repeats = [real_runs(args, bargs, profile_path, policy, rates)
                       for _ in range(args.repeats)]  # fmt: skip
            real[policy] = [median_run(cells) for cells in zip(*repeats)]
            # Kept as they come: `--resimulate` of a stopped run still has these.
            out.write_text(json.dumps({"real": real, "serve_args": SERVE,
                                       "profile": json.loads(profile_path.read_text()),
                                       "profile_competitors": profile_competitors}))  # fmt: skip
        sim[policy] = simulated_runs(bargs, policy, real[policy], profile_competitors)
        rows += compare(policy, real[policy], sim[policy])
    print_table(rows)
    print_gauges(real, sim)
    out.write_text(json.dumps({"rows": rows, "serve_args": SERVE, "sim_args": args.sim_args,
                               "profile": json.loads(Path(profile_path).read_text()),
                               "profile_competitors": profile_competitors,
                               "real": real, "simulated": _plain(sim)}, indent=2))  # fmt: skip
    print(f"wrote {out}")
    return 0


def median_run(cells: tuple[dict, ...]) -> dict:
    """One cell's repeats as one run: the median of each compared figure and gauge, the mean
    of what the machine did meanwhile, every repeat's figures kept (`repeats`)."""
    run = dict(cells[len(cells) // 2])
    for key in TARGETS:
        run[key] = statistics.median(c[key] for c in cells)
    for key in ("background_cores", "deployment_cores", "competitors"):
        run[key] = statistics.fmean(c[key] for c in cells)
    run["profiles"] = [p for c in cells for p in c.get("profiles", [])]
    if all("gauges" in c for c in cells):
        run["gauges"] = {k: statistics.median(c["gauges"][k] for c in cells)
                         for k in cells[0]["gauges"]}  # fmt: skip
    run["repeats"] = [{k: c[k] for k in TARGETS} for c in cells]
    return run


def compare(policy: str, real: list[dict], sim: list[dict]) -> list[dict]:
    rows = []
    for r, s in zip(real, sim):
        row = {"policy": policy, "rate": r["request_rate"],
               "background_cores": round(r["background_cores"], 2),
               "competitors": r.get("competitors"), "drift": round(s["drift"], 2)}  # fmt: skip
        for key in TARGETS:
            values = [c[key] for c in r.get("repeats", [r])]
            row[key] = {"real": r[key], "simulated": s[key],
                        "error": abs(s[key] - r[key]) / r[key] if r[key] else None,
                        "real_spread": (max(values) - min(values)) / r[key] if r[key] else None}  # fmt: skip
        rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'policy':<12}{'rate':>6}{'others':>8}{'runnable':>9}{'drift':>7}"
          + "".join(f"{f'{k} (<{t:.0%})':>36}" for k, t in TARGETS.items()))  # fmt: skip
    for row in rows:
        runnable = "-" if row.get("competitors") is None else f"{row['competitors']:.1f}"
        line = f"{row['policy']:<12}{row['rate']!s:>6}{row['background_cores']:>8.2f}{runnable:>9}"
        line += f"{row.get('drift', 1.0):>7.2f}"
        for key in TARGETS:
            cell = row[key]
            err = "-" if cell["error"] is None else f"{cell['error']:.0%}"
            spread = cell.get("real_spread")
            spread = "" if spread is None else f"±{spread / 2:.0%}"
            line += f"{cell['real']:>10.1f}{spread:>5} /{cell['simulated']:>9.1f} sim {err:>5}"
        print(line)
    print(
        "others: cores other jobs on the machine used during that real run; runnable: the"
        " processes they kept runnable (the simulation shares the cores fairly with them);"
        " drift: the step time of the profiles taken around that run over the first profile's;"
        " real: the median of the repeats, ± half their range"
    )


def print_gauges(real: dict, sim: dict) -> None:
    """Where a miss comes from: the deployment's own gauges, real / simulated."""
    keys = sorted(Gauges.NAMES.values())
    print(f"{'policy':<12}{'rate':>6}" + "".join(f"{k:>22}" for k in keys))
    for policy in real:
        for r, s in zip(real[policy], sim[policy]):
            if "gauges" not in r:
                continue  # recorded before the gauges were
            cells = "".join(f"{r['gauges'][k]:>10.2f} /{s['gauges'][k]:>9.2f}" for k in keys)
            print(f"{policy:<12}{r['request_rate']!s:>6}{cells}")
    print("gauges: time averages while the decode worker is busy, real / simulated")


def _plain(results: dict) -> dict:
    return {p: [{k: v for k, v in r.items() if k != "tpots_ms"} for r in rows]
            for p, rows in results.items()}  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
