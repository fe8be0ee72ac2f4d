"""Deployment faults on loopback: what a LIVAR Flower run records and whether it still computes
the fault-free model.

    python benchmarks/flower_faults.py [--rounds 3] [--round-timeout 30]

A SuperLink and three SuperNodes (``--insecure``, 127.0.0.1) run the ``tiny`` preset with
``flwr run``; each scenario of :mod:`tests.integration.faults` injects one fault with signals:
a SuperNode killed while it trains round 2 and restarted, the ServerApp killed after round 1
and the run resumed from its folder, a node's ClientApp stopped past round 2's timeout and then
let go (a late reply). Each is compared with the same configuration run in-process without
faults (max |difference| of the final global tensors). Results, with the machine:
``benchmarks/results/flower_faults.{json,md}``. Wall times include process starts and, for a
killed node, flwr's heartbeat expiry; run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, save  # noqa: E402

from tests.integration import faults  # noqa: E402

EXPECTED = {  # where the final model should equal the fault-free run's
    "serverapp_killed_and_resumed": True,
    "supernode_killed_and_restarted": False,  # round 2 lacks a client by design
    "reply_after_round_timeout": False,  # round 2 closes without the late client
}


def as_expected(name: str, r: dict, rounds: int) -> bool:
    """Whether the fault happened and the run recorded it as it should."""
    done = r["completed_rounds"] == rounds and r["processes_left"] == 0
    drops = {x["round"]: [d["reason"] for d in x["dropped"]] for x in r["rounds"]}
    if name == "serverapp_killed_and_resumed":
        return done and r["resumed_after"] == [1] and r["max_abs_diff_vs_fault_free"] == 0.0
    expected = "error reply" if name == "supernode_killed_and_restarted" else "round timeout"
    two = drops.get(2, [])
    return done and len(two) == 1 and expected in two[0] and len(r["rounds"][-1]["accepted"]) == 3


def table(results: dict[str, dict]) -> str:
    lines = [
        "| fault | rounds completed | replies accepted per round | dropped (reason) | "
        "final model vs fault-free (max abs diff) | wall s |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        accepted = " / ".join(str(len(x["accepted"])) for x in r["rounds"])
        dropped = "; ".join(
            f"round {x['round']}: {d['reason'].split(': ', 1)[-1][:90]}"
            for x in r["rounds"]
            for d in x["dropped"]
        )
        diff = r["max_abs_diff_vs_fault_free"]
        verdict = "equal" if diff == 0.0 else f"{diff:.2e}"
        if not EXPECTED[name]:
            verdict += " (differs by design)"
        lines.append(
            f"| {r['fault']} | {r['completed_rounds']} | {accepted} | {dropped or 'none'} | "
            f"{verdict} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--round-timeout", type=float, default=30.0)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="flower-faults-"))
    reference = faults.fault_free_reference(root, args.rounds)
    results = {
        "supernode_killed_and_restarted": faults.supernode_killed_and_restarted(
            root / "killed-node", reference, args.rounds
        ),
        "serverapp_killed_and_resumed": faults.serverapp_killed_and_resumed(
            root / "killed-server", reference, args.rounds
        ),
        "reply_after_round_timeout": faults.reply_after_round_timeout(
            root / "late-reply", reference, args.rounds, args.round_timeout
        ),
    }
    for name, r in results.items():
        r["as_expected"] = as_expected(name, r, args.rounds)
    summary = {
        "machine": machine(),
        "setup": {"preset": "tiny", "nodes": 3, "rounds": args.rounds,
                  "round_timeout_late_reply": args.round_timeout, "transport": "insecure loopback"},
        "scenarios": results,
    }  # fmt: skip
    md = "\n".join(
        [
            f"# Flower deployment faults on loopback (tiny preset, 3 SuperNodes, "
            f"{args.rounds} rounds)",
            "",
            table(results),
            "",
            "Per-round records (accepted clients, download MB, resyncs) and timelines: "
            "`flower_faults.json`.",
            f"Machine: {summary['machine']}",
        ]
    )
    save("flower_faults", summary, md)
    print(md)
    if not all(r["as_expected"] for r in results.values()):
        sys.exit("a scenario did not end as expected; see the JSON")


if __name__ == "__main__":
    main()
