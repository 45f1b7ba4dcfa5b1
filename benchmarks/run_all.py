"""Run every benchmark, write its JSON under benchmarks/results/ and a summary in benchmarks/README.md.

Each benchmark runs in its own Python process (thread settings, compiled graphs and peak memory
do not leak between them). The summary lists every target as met or missed with the measured
figure, then the main tables and the optimisation experiments.

    python benchmarks/run_all.py                      # full suite (CPU, minutes)
    python benchmarks/run_all.py --quick --out-dir /tmp/bench --readme /tmp/bench/README.md
    python benchmarks/run_all.py --only forward inference --checkpoint runs/my-agent
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCHMARK_DIR = Path(__file__).resolve().parent

# name -> (script, extra arguments of the full run)
BENCHMARKS: dict[str, tuple[str, list[str]]] = {
    "forward": ("bench_forward.py", ["--experiments", "--compile"]),
    "forward_channels_last": ("bench_forward.py", ["--channels-last"]),
    "resnet": ("bench_resnet.py", []),
    "env": ("bench_env.py", []),
    "training": ("bench_training.py", []),
    "inference": ("bench_inference.py", []),
    "memory": ("bench_memory.py", []),
}
# An experiment "pays" when it is at least this much faster than the default, beyond noise.
PAYS_THRESHOLD = 1.05


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a smoke test (seconds per benchmark)")
    parser.add_argument("--out-dir", type=Path, default=BENCHMARK_DIR / "results", help="folder of the JSON files")
    parser.add_argument("--readme", type=Path, default=BENCHMARK_DIR / "README.md", help="markdown summary to write")
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), help="run only these benchmarks")
    parser.add_argument("--checkpoint", default=None, help="trained agent for bench_inference (run directory or .pt)")
    return parser.parse_args()


def run_benchmark(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run one benchmark script in a fresh interpreter; return its exit status and wall time."""
    script, extra = BENCHMARKS[name]
    command = [sys.executable, str(BENCHMARK_DIR / script), "--out", str(args.out_dir / f"{name}.json"), *extra]
    if args.quick:
        command = [arg for arg in command if arg != "--compile"] + ["--quick"]
    if name == "inference" and args.checkpoint:
        command += ["--checkpoint", args.checkpoint]
    print(f"== {name}: {' '.join(command[1:])}", flush=True)
    started = time.perf_counter()
    done = subprocess.run(command, cwd=BENCHMARK_DIR.parent, check=False)
    return {"returncode": done.returncode, "wall_seconds": time.perf_counter() - started}


def load_results(out_dir: Path, names: list[str]) -> dict[str, Any]:
    """The JSON of each named benchmark that wrote one."""
    results = {}
    for name in names:
        path = out_dir / f"{name}.json"
        if path.is_file():
            results[name] = json.loads(path.read_text())
    return results


# ---------------------------------------------------------------------------------------------
# Markdown summary


def targets_table(results: dict[str, Any]) -> list[str]:
    lines = ["| Target | Measured | Required | Verdict |", "|---|---|---|---|"]
    for name, result in results.items():
        for entry in result.get("targets", []):
            verdict = "met" if entry["met"] else "**missed**"
            lines.append(
                f"| {name}: {entry['description']} | {entry['measured']:.3g} | "
                f"{entry['comparison']} {entry['target']:g} | {verdict} |"
            )
    return lines


def forward_tables(forward: dict[str, Any]) -> list[str]:
    lines = [
        "Speed-up = all-kept sparse time / sparse time at the keep fraction; in brackets the fraction "
        "of the ideal (kept-FLOPs) speed-up reached. Masked = sparse speed-up over masked mode at the "
        "same policy.",
        "",
        "| Network | Batch | Full ms | keep 0.75 | keep 0.5 | keep 0.25 | sparse / masked at 0.5 |",
        "|---|---|---|---|---|---|---|",
    ]
    for arch, entry in forward["archs"].items():
        for batch, row in entry["batches"].items():
            keep = row["keep"]
            cells = [f"{keep[f]['speedup']:.2f}x ({keep[f]['fraction_of_ideal']:.0%} of {keep[f]['ideal_speedup']:.2f}x)"
                     for f in ("0.75", "0.5", "0.25")]
            masked = keep["0.5"].get("sparse_over_masked_speedup")
            masked_cell = f"{masked:.2f}x" if masked is not None else "-"
            lines.append(f"| {arch} | {batch} | {row['full_ms']:.1f} | {' | '.join(cells)} | {masked_cell} |")
    lines += ["", "| Network | Batch | all-one ms | all-zero ms | zero / one time | zero / one FLOPs |", "|---|---|---|---|---|---|"]
    for arch, entry in forward["archs"].items():
        if "zero_one" in entry:
            z = entry["zero_one"]
            lines.append(f"| {arch} | {z['batch_size']} | {z['all_one_ms']:.1f} | {z['all_zero_ms']:.2f} | "
                         f"{z['zero_over_one_time']:.3f} | {z['zero_over_one_flops']:.3f} |")
    notes = [f"- {arch}: {entry['note']}" for arch, entry in forward["archs"].items() if entry.get("note")]
    return lines + ([""] + notes if notes else [])


def verdict(speedup: float) -> str:
    return "pays" if speedup >= PAYS_THRESHOLD else "does not pay"


def experiment_lines(experiments: dict[str, Any]) -> list[str]:
    lines = [f"On {experiments['arch']}, half of the blocks kept per sample; speed-up > 1 means faster "
             f"than the default. \"Pays\" means >= {PAYS_THRESHOLD}x.", ""]
    for key, entry in experiments.items():
        if not key.startswith("batch"):
            continue
        batch = key.removeprefix("batch")
        inference = entry["inference_mode"]["speedup_over_no_grad"]["inference_mode"]
        channels = entry["channels_last"]["channels_last_speedup"]
        threads = entry["threads"]["speedup_over_threads_1"]["threads_2"]
        gather = entry["gather"]["current_speedup"]
        lines += [
            f"- batch {batch}: gathering kept rows by indexing once, with an in-place shortcut add, over "
            f"`index_select` twice: contiguous {gather['contiguous']:.2f}x, channels-last {gather['channels_last']:.2f}x "
            f"({verdict(max(gather.values()))}).",
            f"- batch {batch}: `torch.inference_mode` over `torch.no_grad`: {inference:.2f}x ({verdict(inference)}).",
            f"- batch {batch}: channels-last: full {channels['full']:.2f}x, half kept {channels['half_kept']:.2f}x "
            f"({verdict(min(channels.values()))}).",
            f"- batch {batch}: 2 threads over 1 thread: {threads:.2f}x ({verdict(threads)}).",
        ]
    for key, entry in experiments.items():
        if key.startswith("grouping"):
            grouped = entry["grouped_speedup"]
            lines.append(
                f"- grouping by identical policy, batch {entry['batch_size']}: random policies "
                f"{grouped['random_policies']:.2f}x, 4 distinct policies {grouped['4_distinct_policies']:.2f}x "
                f"over per-block gather/scatter."
            )
    compiled = experiments.get("compile_batch32", {})
    if compiled.get("status") == "ok":
        seconds = compiled["compile_seconds"]
        speed = compiled["compiled_speedup"]
        lines.append(
            f"- `torch.compile`, batch 32: full {speed['full']:.2f}x, half kept (one fixed policy) "
            f"{speed['half_kept']:.2f}x; compiling took {seconds['full']:.0f} s (full) and "
            f"{seconds['sparse_half_fixed_policy']:.0f} s (sparse), and every new kept-count pattern recompiles "
            f"or graph-breaks."
        )
    else:
        lines.append(f"- `torch.compile`: {compiled.get('status', 'not run')}: {compiled.get('error', '')}")
    return lines


def other_lines(results: dict[str, Any]) -> list[str]:
    lines = []
    if "env" in results:
        rates = results["env"]["images_per_second"]
        lines += ["## Environment", "", "| Runner | images/s |", "|---|---|"]
        lines += [f"| {name} | {rate:.0f} |" for name, rate in rates.items()]
        ratios = results["env"]["ratios"]
        if "bare_batch_n_over_batch_1" in ratios:
            lines += [
                "",
                f"A bare batch-{results['env']['setup']['num_envs']} forward classifies "
                f"{ratios['bare_batch_n_over_batch_1']:.1f}x as many images per second as bare batch-1 forwards: "
                "no env can batch its way past that. The native vector env runs at "
                f"{ratios['vector_over_bare_batch_n']:.0%} of the bare batched rate, the single-env loop at "
                f"{ratios['single_loop_over_bare_batch_1']:.0%} of the bare batch-1 rate.",
            ]
        lines.append("")
    if "training" in results:
        training = results["training"]
        lines += ["## Training", "", f"Batch {training['batch_size']}, {training['setup']['arch']}.", "",
                  "| Configuration | images/s |", "|---|---|"]
        lines += [f"| {name} | {rate:.0f} |" for name, rate in training["images_per_second"].items()]
        lines.append("")
        for step, shares in training["breakdown"].items():
            parts = ", ".join(f"{part} {share:.0%}" for part, share in shares.items())
            lines.append(f"- {step}: {parts}")
        lines.append("")
    if "inference" in results:
        inference = results["inference"]
        lines += ["## Batch-1 inference", "",
                  f"{inference['setup']['mode']} mode, {inference['num_blocks']} blocks, "
                  f"{inference['blocks_kept_mean']:.1f} kept on average: agent {inference['latency_ms']['agent']:.2f} ms "
                  f"vs full {inference['latency_ms']['full']:.2f} ms, latency speed-up "
                  f"{inference['latency_speedup']:.2f}x vs FLOPs speed-up {inference['flops_speedup']:.2f}x "
                  f"(policy network included; ResNet only {inference['flops_speedup_resnet_only']:.2f}x).", ""]
    if "memory" in results:
        memory = results["memory"]
        lines += ["## Peak memory", "",
                  f"- dataset {memory['dataset']['source']}, {memory['dataset']['num_images']} images: peak RSS "
                  f"+{memory['dataset']['peak_rss_growth_mb']:.1f} MB for {memory['dataset']['pixel_mb']:.1f} MB "
                  f"of pixels, decoded in {memory['dataset']['seconds']:.1f} s.",
                  f"- training, {memory['training']['steps']} REINFORCE steps at batch "
                  f"{memory['training']['batch_size']} ({memory['training']['arch']}): peak RSS "
                  f"+{memory['training']['peak_rss_growth_mb']:.1f} MB "
                  f"(+{memory['training']['peak_rss_growth_during_steps_mb']:.1f} MB during the steps).", ""]
    return lines


def write_readme(path: Path, results: dict[str, Any], runs: dict[str, Any], quick: bool) -> None:
    """Write the markdown summary of one suite run."""
    setup = next(iter(results.values()))["setup"] if results else {}
    lines = [
        "# Benchmarks",
        "",
        "Generated by `python benchmarks/run_all.py`" + (" --quick (smoke-test sizes: the figures mean nothing)" if quick else "")
        + ". Every speed-up is a ratio of median times measured side by side in one process (interleaved "
        "rounds), on random weights and random inputs unless stated.",
        "",
        f"Machine: {setup.get('processor', '?')}, {setup.get('cpu_count', '?')} CPUs, torch {setup.get('torch', '?')}, "
        f"{setup.get('torch_num_threads', '?')} threads, niceness {setup.get('niceness', '?')}, load average at start "
        f"{setup.get('load_average_at_start', '?')}.",
        "",
        "## Targets",
        "",
        *targets_table(results),
        "",
    ]
    if "forward" in results:
        lines += ["## Forward: sparse vs masked vs full", "", *forward_tables(results["forward"]), ""]
        if "experiments" in results["forward"]:
            lines += ["## What was tried", "", *experiment_lines(results["forward"]["experiments"]), ""]
            for note in NOTES:
                lines += [note, ""]
    if "forward_channels_last" in results:
        lines += [
            "## Forward with channels-last weights",
            "",
            "The same grid with the weights stored channels-last, the layout the env uses on a CPU.",
            "",
            *forward_tables(results["forward_channels_last"]),
            "",
        ]
    lines += other_lines(results)
    lines += ["## Wall time", "", "| Benchmark | seconds | exit status |", "|---|---|---|"]
    lines += [f"| {name} | {run['wall_seconds']:.0f} | {run['returncode']} |" for name, run in runs.items()]
    lines += [f"| {name} | - | not run; figures from an earlier call |" for name in results if name not in runs]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


NOTES = [
    "Grouping by identical policy is implemented only in `bench_forward.py` (`forward_grouped`); it "
    "stays out of `BlockDropResNet._forward_sparse` unless the figures above show it paying for the "
    "policies the env sees (random per-sample policies at training time).",
    "The block-sparse forward keeps a channels-last layout through its gathers, so channels-last pays "
    "with blocks dropped too. On a CPU the env, `evaluate_policy` and the agents' policy networks therefore "
    "store their weights channels-last (`blockdrop_env.resnet.prefer_channels_last`); the env, training "
    "and inference figures above are measured that way.",
]


def main() -> None:
    args = parse_args()
    names = args.only or list(BENCHMARKS)
    started = time.perf_counter()
    runs = {name: run_benchmark(name, args) for name in names}
    # Benchmarks left out by --only keep their last JSON, so the summary stays complete.
    earlier = [name for name in BENCHMARKS if name not in names]
    results = load_results(args.out_dir, [name for name in names if runs[name]["returncode"] == 0] + earlier)
    write_readme(args.readme, results, runs, args.quick)
    failed = [name for name, run in runs.items() if run["returncode"] != 0]
    print(f"suite finished in {time.perf_counter() - started:.0f} s" + (f"; failed: {failed}" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
