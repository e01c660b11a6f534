"""Run every benchmark in one go, check each figure against its target, and write the results.

    python -m bench.run            # full run (about 9 minutes on 2 cores); rewrites the results in bench/RESULTS.md
    python -m bench.run --quick    # small sizes, to check the scripts still work (CI; the original PyFed's
                                   # side of "outside" is left out); writes to --out

Everything in one run, so the ratios compare like with like on a shared, noisy machine.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench import aggregate, many_clients, original, outside, round as round_bench, wire
from bench.common import free_port, BENCH, machine, table

START, END = "<!-- results:start -->", "<!-- results:end -->"


def targets(results: dict) -> list[list]:
    """(figure, target, measured, met) rows."""
    w, r, a, m = results["wire"], results["round"], results["aggregate"], results["many_clients"]
    rows = [
        ["wire throughput", ">= 1,000 MB/s", f"{w['pyfed_mb_per_s']:,.0f} MB/s", w["pyfed_mb_per_s"] >= 1000],
        ["wire vs raw socket", ">= 50%", f"{w['pyfed_share_of_raw']:.0%}", w["pyfed_share_of_raw"] >= 0.5],
        ["wire vs original PyFed", ">= 15x", f"{w['speedup_vs_original']:.1f}x", w["speedup_vs_original"] >= 15],
        ["round overhead", "<= 0.3 s", f"{r['seed']['pyfed']['median_overhead_s']:.3f} s",
         r["seed"]["pyfed"]["median_overhead_s"] <= 0.3],
        ["round overhead share", "<= 5% of the round", f"{r['pyfed_overhead_share']:.1%}", r["pyfed_overhead_share"] <= 0.05],
        ["round overhead vs original", ">= 5x", f"{r['overhead_ratio']:.1f}x", r["overhead_ratio"] >= 5],
        ["tiny-data round vs original", ">= 10x", f"{r['tiny_round_ratio']:.1f}x", r["tiny_round_ratio"] >= 10],
    ]
    sizes = sorted(a["n"], key=int)
    largest = a["n"][sizes[-1]]
    copies = max(entry["pyfed_peak_model_copies"] for entry in a["n"].values())
    spread = max(e["pyfed_peak_model_copies"] for e in a["n"].values()) - min(e["pyfed_peak_model_copies"] for e in a["n"].values())
    per_update = [a["n"][n]["pyfed_ms_per_update"] for n in sizes]
    rows += [
        ["aggregation memory", "<= ~3 model copies, independent of N",
         f"{copies:.2f} copies (spread over N {spread:.3f})", copies <= 3.2 and spread < 0.05],
        ["aggregation time", "linear in N, within 2x of numpy axpy",
         f"{min(per_update):.1f}-{max(per_update):.1f} ms/update; {largest['ratio_to_axpy']:.2f}x axpy at N={sizes[-1]}",
         largest["ratio_to_axpy"] <= 2 and max(per_update) <= 2 * min(per_update)],
        [f"{m['clients']} clients", "all aggregated, < 30 s per round",
         f"all: {m['all_updates_aggregated']}, median {m['median_round_s']:.1f} s",
         m["all_updates_aggregated"] and m["median_round_s"] < 30],
        ["server peak RSS vs original", "(reported)", f"{r['seed']['pyfed']['server_peak_rss_mb']:.0f} MB vs "
         f"{r['seed']['original']['server_peak_rss_mb']:.0f} MB ({r['server_rss_ratio']:.1f}x less)", True],
    ]
    o = results["outside"]
    if "original_over_pyfed" in o:  # not in a --quick run
        rows.append(["a round from outside vs original", ">= 8x cheaper", f"{o['original_over_pyfed']:.1f}x",
                     o["original_over_pyfed"] >= 8])
    rows += [
        ["a round from outside vs its floor", "<= 1.2x (slowest fit + transfers)", f"{o['pyfed_round_over_floor']:.2f}x",
         o["pyfed_round_over_floor"] <= 1.2],
    ]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes: check the scripts work")
    parser.add_argument("--out", type=Path, default=None, help="write the markdown here instead of bench/RESULTS.md")
    args = parser.parse_args()
    started = time.monotonic()
    results = {"machine": machine(), "quick": args.quick, "section_seconds": {}}
    sections_to_run = {
        "original_wire": lambda: original.wire(repeats=2 if args.quick else 5, port=free_port()),
        "wire": lambda: wire.run(args.quick, original=results["original_wire"]),
        "round": lambda: round_bench.run(args.quick),
        # --quick: PyFed's side only; the original's driver is run by "round", and its outside walls
        # (two whole runs of its 5.4M-weight model) were most of the 12 minutes that section took in CI
        "outside": lambda: outside.run(args.quick, with_original=not args.quick),
        "aggregate": lambda: aggregate.run(args.quick),
        "many_clients": lambda: many_clients.run(args.quick),
    }
    for name, run_section in sections_to_run.items():
        section_started = time.monotonic()
        results[name] = run_section()
        results["section_seconds"][name] = round(time.monotonic() - section_started, 1)
        print(f"bench: {name} took {results['section_seconds'][name]:.0f} s", flush=True)
    results["seconds"] = time.monotonic() - started

    rows = [[figure, target, measured, "yes" if met else "**no**"] for figure, target, measured, met in targets(results)]
    sections = [table("Targets", ["figure", "target", "measured", "met"], rows)]
    for name in ("wire", "round", "outside", "aggregate", "many_clients"):
        sections.append(results[name].pop("_markdown", ""))
    env = results["machine"]
    header = (f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `python -m bench.run"
              f"{' --quick' if args.quick else ''}` in {results['seconds']:.0f} s on: {env['cpu']}, "
              f"{env['cores']} cores, {env['memory_gb']} GiB; {env['os']}; Python {env['python']}, "
              f"TensorFlow {env.get('tensorflow', '?')}, Keras {env.get('keras', '?')}, NumPy {env['numpy']}, "
              f"pyzmq {env['pyzmq']} (libzmq {env['libzmq']}); original PyFed {original.ORIGINAL}.\n")
    block = "\n".join([START, header, *[s for s in sections if s], END])
    print("\n" + block)
    out = args.out or BENCH / "RESULTS.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    text = out.read_text() if out.exists() else f"# Benchmark results\n\n{START}\n{END}\n"
    if START not in text:
        text += f"\n{START}\n{END}\n"
    before, rest = text.split(START, 1)
    after = rest.split(END, 1)[1]
    out.write_text(before + block + after)
    (out.with_suffix(".json")).write_text(json.dumps(results, indent=2, default=float))
    print(f"\nwrote {out} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
