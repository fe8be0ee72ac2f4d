"""The secure deployment of docs/flower.md on loopback: credentials from ``livar-flower-certs``, a
SuperLink with TLS and SuperNode authentication, nodes registered with ``flwr supernode
register``, SuperNodes on other CPU code paths and thread counts (one whose fold is one ulp off),
``flwr run`` of LIVAR in ``product`` mode at ViT-S block widths, compared with the in-process
engine; and every intruder refused: an unregistered key, no TLS, another CA, a server
certificate without the address dialled, a node with a tampered G_SHAP table."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch

pytest.importorskip("flwr")
pytestmark = pytest.mark.usefixtures("task_identity")

from safetensors.torch import load_file  # noqa: E402

from tests.helpers import REPO  # noqa: E402
from tests.integration.deployment import TOOLS, Loopback, free_ports, port_open  # noqa: E402

# Code injected into one node's processes (a sitecustomize on its PYTHONPATH): when the module
# named TARGET is imported, from wherever (the app bundle Flower ships), PATCH runs on it.
HOOK = textwrap.dedent(
    """
    import importlib.abc, importlib.util, sys

    TARGET = {target!r}

    def patch(module):
    {patch}

    class _Hook(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != TARGET:
                return None
            sys.meta_path.remove(self)
            try:
                spec = importlib.util.find_spec(name)
            finally:
                sys.meta_path.insert(0, self)
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                patch(module)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _Hook())
    """
)

ONE_ULP_OFF_FOLD = """\
    import torch
    fold = module.fold_updates

    def one_ulp_off(model, updates):
        fold(model, updates)
        weight = next(iter(module.base_parameters(model).values()))
        with torch.no_grad():
            flat = weight.view(-1)
            flat[0] = torch.nextafter(flat[0], torch.tensor(float("inf")))

    module.fold_updates = one_ulp_off
"""

TAMPERED_TABLE = """\
    from livar_merge.tables import content_checksum
    cls = module.GShapTable
    load = cls.load.__func__

    def tampered(klass, *args, **kwargs):
        document = load(klass, *args, **kwargs).to_document(with_checksum=False)
        document["values"][0][0] += 0.25
        document["checksum"] = content_checksum(document)
        return klass.from_document(document)

    cls.load = classmethod(tampered)
"""


def hook_dir(root: Path, target: str, patch: str) -> Path:
    folder = root / f"hook-{target.rsplit('.', 1)[-1]}"
    folder.mkdir()
    code = HOOK.format(target=target, patch=textwrap.indent(textwrap.dedent(patch), "    "))
    (folder / "sitecustomize.py").write_text(code)
    return folder


WIDTHS = "embed-dim=384 num-heads=6"  # ViT-S/14's block widths: qkv 1152 x 384, fc1 1536 x 384


@pytest.fixture(scope="module")
def inprocess_vit_s_widths(tmp_path_factory):
    from livar_merge.engines.inprocess import run_federated
    from livar_merge.federated.config import resolve_config

    out = tmp_path_factory.mktemp("inprocess-vit-s")
    config = resolve_config("tiny", None, {"embed_dim": 384, "num_heads": 6, "rounds": 3})
    return out, run_federated(config, out)


@pytest.mark.slow
@pytest.mark.skipif(
    os.name != "posix" or not Path("/proc/self/environ").exists(), reason="needs Linux /proc"
)
def test_secure_deployment_with_heterogeneous_nodes_and_every_intruder_refused(
    tmp_path, inprocess_vit_s_widths
):
    if not all(shutil.which(t) for t in (*TOOLS, "livar-flower-certs")):
        pytest.skip("flwr or livar command-line tools not installed")
    creds = tmp_path / "creds"
    made = subprocess.run(
        ["livar-flower-certs", str(creds), "--nodes", "4"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
    assert "--enable-supernode-auth" in made.stdout
    out = tmp_path / "results"
    link, bad_link, *node_ports = free_ports(10)
    address = f"127.0.0.1:{link}"
    tls = ["--ssl-ca-certfile", f"{creds}/ca.crt", "--ssl-certfile", f"{creds}/server.crt",
           "--ssl-keyfile", f"{creds}/server.key"]  # fmt: skip

    with Loopback(tmp_path) as deployment:

        def supernode(name: str, port: int, partition: int, *flags: str, env=None) -> None:
            deployment.start(
                name,
                ["flower-supernode", "--superlink", address, "--host", "127.0.0.1",
                 "--port", str(port), "--max-retries", "2", "--node-config",
                 f"partition-id={partition} num-partitions=3", *flags],
                env=env,
            )  # fmt: skip

        def authenticated(m: int) -> list[str]:
            return ["--root-certificates", f"{creds}/ca.crt",
                    "--auth-supernode-private-key", f"{creds}/supernode-{m}.key"]  # fmt: skip

        deployment.start(
            "superlink",
            ["flower-superlink", "--host", "127.0.0.1", "--port", str(link), *tls,
             "--enable-supernode-auth"],
        )  # fmt: skip
        deployment.wait_for(lambda: port_open(link), 60, "the SuperLink to listen")
        deployment.cli_config("secure", address, root_certificates=creds / "ca.crt")
        registered = []
        for m in range(4):  # supernode-3 is the tampered node of the second run
            done = deployment.flwr("supernode", "register", f"{creds}/supernode-{m}.pub",
                                   "secure", "--format", "json")  # fmt: skip
            assert done.returncode == 0, done.stdout + done.stderr
            registered.append(int(json.loads(done.stdout)["node-id"]))

        # ---------------------------------------------------------------- intruders
        from livar_merge.flower.certs import make_ca, node_key, server_certificate

        (tmp_path / "other-ca.crt").write_bytes(make_ca().certificate_pem())
        intruder_key = tmp_path / "intruder.key"
        intruder_key.write_bytes(node_key().private_openssh())
        intruder_key.chmod(0o600)
        supernode("unregistered", node_ports[0], 0, "--root-certificates", f"{creds}/ca.crt",
                  "--auth-supernode-private-key", str(intruder_key))  # fmt: skip
        supernode("plaintext", node_ports[1], 0, "--insecure")
        supernode("other-ca", node_ports[2], 0, "--root-certificates",
                  str(tmp_path / "other-ca.crt"), "--auth-supernode-private-key",
                  f"{creds}/supernode-0.key")  # fmt: skip
        # a SuperLink whose certificate (from a CA the node trusts) lacks the address it dials
        wrong_ca = make_ca()
        wrong = server_certificate(wrong_ca, ["superlink.livar.invalid"])
        bad = tmp_path / "wrong-san"
        bad.mkdir()
        (bad / "server.crt").write_bytes(wrong.certificate_pem())
        (bad / "server.key").write_bytes(wrong.key_pem())
        deployment.start(
            "superlink-wrong-san",
            ["flower-superlink", "--host", "127.0.0.1", "--port", str(bad_link),
             "--ssl-ca-certfile", f"{creds}/ca.crt", "--ssl-certfile", f"{bad}/server.crt",
             "--ssl-keyfile", f"{bad}/server.key"],
        )  # fmt: skip
        deployment.wait_for(lambda: port_open(bad_link), 60, "the second SuperLink")
        (tmp_path / "wrong-san-ca.crt").write_bytes(wrong_ca.certificate_pem())
        deployment.start(
            "wrong-san",
            ["flower-supernode", "--superlink", f"127.0.0.1:{bad_link}", "--host", "127.0.0.1",
             "--port", str(node_ports[3]), "--max-retries", "2",
             "--root-certificates", f"{tmp_path}/wrong-san-ca.crt"],
        )  # fmt: skip
        refusals = {
            "unregistered": "Failed to activate SuperNode",
            "plaintext": "could not establish a connection to the SuperLink",
            "other-ca": "certificate verify failed: unable to get local issuer certificate",
            "wrong-san": "IP address mismatch, certificate is not valid for '127.0.0.1'",
        }
        for name, message in refusals.items():
            assert deployment.exited(name, 120) != 0, deployment.log(name)
            assert message in deployment.log(name), deployment.log(name)
            assert "SuperNode ID" not in deployment.log(name)
        assert "No SuperNode found with the given public key" in deployment.log("superlink")

        # ------------------------------------------- three nodes on different machines
        perturbed = hook_dir(tmp_path, "livar_merge.flower.base_sync", ONE_ULP_OFF_FOLD)
        # (ATEN_CPU_CAPABILITY=default would also change timm's random initialisation, which
        # the frozen-backbone checksum refuses: tests/unit/flower/test_base_sync.py folds
        # under it; a pretrained backbone is read from its file, the same everywhere)
        machines = {
            0: {"OMP_NUM_THREADS": "1"},
            1: {"OMP_NUM_THREADS": "2", "MKL_CBWR": "COMPATIBLE"},
            2: {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(perturbed)},
        }
        for m, env in machines.items():
            supernode(f"node{m}", node_ports[4 + m], m, *authenticated(m), env=env)
        deployment.wait_for(
            lambda: all("SuperNode ID" in deployment.log(f"node{m}") for m in range(3)),
            120,
            "three SuperNodes to connect",
        )
        ids = {m: deployment.node_id(f"node{m}") for m in range(3)}
        assert sorted(ids.values()) == sorted(registered[:3])
        deployment.run_app(
            "secure",
            f"preset='tiny' options='{WIDTHS}' rounds=3 out='{out}' min-replies=3 "
            "node-wait-timeout=30.0 round-timeout=300.0",
        )
        deployment.wait_for(lambda: (out / "summary.json").is_file(), 600, "the secure run")

        # ------------------- a fourth node (partition 2 again) with a tampered table joins
        tampered = hook_dir(tmp_path, "livar_merge.tables", TAMPERED_TABLE)
        supernode("tampered", node_ports[7], 2, *authenticated(3),
                  env={"PYTHONPATH": str(tampered)})  # fmt: skip
        deployment.wait_for(
            lambda: "SuperNode ID" in deployment.log("tampered"), 120, "the tampered node"
        )
        tampered_out = tmp_path / "results-tampered"
        deployment.run_app(
            "secure",
            f"preset='tiny' rounds=1 out='{tampered_out}' min-replies=3 node-wait-timeout=30.0 "
            "round-timeout=300.0",
        )
        deployment.wait_for(
            lambda: (tampered_out / "summary.json").is_file(), 600, "the run with the tampered node"
        )
    assert deployment.all_gone(), "processes started by the test are still running"

    # every round complete, every reply accepted, the perturbed node recovered in its round
    summary = json.loads((out / "summary.json").read_text())
    assert summary["completed_rounds"] == 3
    metrics = pd.read_csv(out / "metrics.csv")
    assert metrics["replies_accepted"].tolist() == [3, 3, 3]
    assert metrics["replies_dropped"].tolist() == [0, 0, 0]
    replies = pd.read_csv(out / "replies.csv").fillna({"base_resync": ""})
    assert replies["accepted"].all()
    by = {(int(r["round"]), int(r["node_id"])): r for _, r in replies.iterrows()}
    assert "differ from the server's" in by[(2, ids[2])]["base_resync"]
    assert all(by[(r, ids[m])]["base_resync"] == "" for r in (1, 2, 3) for m in (0, 1))
    full = by[(1, ids[0])]["download_bytes"]
    for m in (0, 1):  # other code paths and thread counts: light downloads, folded exactly
        assert by[(2, ids[m])]["download_bytes"] < full / 3
        assert by[(3, ids[m])]["download_bytes"] < full / 3
    assert by[(2, ids[2])]["download_bytes"] == by[(2, ids[0])]["download_bytes"] + full
    assert by[(3, ids[2])]["download_bytes"] == full  # remembered: the full weights directly
    bytes_table = replies.pivot(index="round", columns="node_id", values="download_bytes")
    print("download bytes per node per round:\n" + bytes_table.to_string())

    # the same model as the in-process engine (training on other thread counts and kernels
    # is not bit-identical; the fold is)
    folder, reference = inprocess_vit_s_widths
    got = load_file(str(out / "checkpoint" / "global.safetensors"))
    expected = load_file(str(folder / "checkpoint" / "global.safetensors"))
    assert got.keys() == expected.keys()
    worst = max(float((got[k] - expected[k]).abs().max()) for k in got)
    print(f"largest difference from the in-process engine: {worst:.3g}")
    for key in got:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-5, msg=key)
    assert summary["accuracy_per_round"] == pytest.approx(
        reference["accuracy_per_round"], abs=1.01 / 200
    )

    # the tampered node trained, and its reply was refused every round with the reason
    rows = pd.read_csv(tampered_out / "replies.csv")
    refused = rows[~rows["accepted"]]
    assert refused["node_id"].tolist() == [registered[3]]
    assert "info key 'table-checksum'" in refused["reason"].iloc[0]
    assert sorted(rows.loc[rows["accepted"], "node_id"]) == sorted(ids.values())
    print(f"secure deployment test ({sys.platform}): refusals {sorted(refusals)}")


def test_the_certificate_tool_refuses_to_overwrite_and_writes_owner_only_keys(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key

    from livar_merge.apps.flower_certs import main

    assert main([str(tmp_path / "c"), "--nodes", "2", "--san", "10.0.0.5",
                 "--san", "superlink.example.org"]) == 0  # fmt: skip
    folder = tmp_path / "c"
    assert sorted(p.name for p in folder.iterdir()) == [
        "bundle.json", "ca.crt", "ca.key", "server.crt", "server.key",
        "supernode-0.key", "supernode-0.pub", "supernode-1.key", "supernode-1.pub",
    ]  # fmt: skip
    for key in folder.glob("*.key"):
        assert key.stat().st_mode & 0o077 == 0, key
    server = x509.load_pem_x509_certificate((folder / "server.crt").read_bytes())
    ca = x509.load_pem_x509_certificate((folder / "ca.crt").read_bytes())
    server.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)} == {
        "127.0.0.1", "::1", "10.0.0.5"
    }  # fmt: skip
    assert set(sans.get_values_for_type(x509.DNSName)) == {"localhost", "superlink.example.org"}
    public = load_ssh_public_key((folder / "supernode-1.pub").read_bytes())
    assert public.curve.name == "secp384r1"  # type: ignore[union-attr]
    record = json.loads((folder / "bundle.json").read_text())
    assert set(record["supernodes"]) == {"supernode-0", "supernode-1"}
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert main([str(folder)]) == 2  # never overwritten
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert main([str(tmp_path / "d"), "--san", "bad name"]) == 2
    assert not (tmp_path / "d").exists()  # a refused run leaves nothing
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def free_block(size: int) -> int:
    """A port ``p`` with ``p .. p + size - 1`` free now."""
    import socket

    for _ in range(50):
        (base,) = free_ports(1)
        sockets = []
        try:
            for port in range(base, base + size):
                s = socket.socket()
                s.bind(("127.0.0.1", port))
                sockets.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise AssertionError(f"no block of {size} free ports")


@pytest.mark.slow
@pytest.mark.skipif(
    os.name != "posix" or not Path("/proc/self/environ").exists(), reason="needs Linux /proc"
)
def test_the_scripted_secure_deployment_gives_the_inprocess_run(tmp_path, inprocess_run):
    """``scripts/flower_secure_local.sh`` as docs/flower.md runs it: TLS, registered SuperNode
    keys, three SuperNodes, ``flwr run``; the same accuracies and model as the in-process
    engine, and nothing left running."""
    from tests.integration.deployment import MARK, marked_processes

    if not all(shutil.which(t) for t in (*TOOLS, "livar-flower-certs")):
        pytest.skip("flwr or livar command-line tools not installed")
    token = f"script-{os.getpid()}-{tmp_path.name}"
    work = tmp_path / "secure"
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "flower_secure_local.sh"), str(work), "3",
         "preset='tiny' node-wait-timeout=30.0 round-timeout=300.0"],
        env={**os.environ, MARK: token, "LIVAR_SUPERLINK_PORT": str(free_block(4))},
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    logs = "\n".join(
        f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}"
        for p in sorted((work / "logs").glob("*.log"))
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr + logs
    assert "3 SuperNodes authenticated" in done.stdout
    assert "Activated node_id" in (work / "logs" / "superlink.log").read_text()
    assert marked_processes(token) == [], "the script left processes running"
    summary = json.loads((work / "results" / "summary.json").read_text())
    folder, reference = inprocess_run
    assert summary["completed_rounds"] == reference["completed_rounds"]
    assert summary["accuracy_per_round"] == pytest.approx(
        reference["accuracy_per_round"], abs=1.01 / 200
    )
    got = load_file(str(work / "results" / "checkpoint" / "global.safetensors"))
    expected = load_file(str(folder / "checkpoint" / "global.safetensors"))
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-5, msg=key)
