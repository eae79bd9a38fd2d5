"""`specsplit serve --ray` as a user runs it: flags refused in one line, then a deployment of
one SmolLM2 replica on a local Ray instance of its own (the module's one Ray instance) that
`specsplit generate --server HOST:PORT` uses like a single server, and SIGTERM stopping the
command with every process it started."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import free_port
from test_cli import ROOT, assert_one_line_error, run

pytest.importorskip("ray")


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--tls-cert", "c.pem", "--tls-key", "k.pem"], "no TLS"),
        (["--replicas", "2", "--autoscale", "1:2"], "either --replicas or --autoscale"),
        (["--autoscale", "3:2"], "MIN:MAX"),
        (["--replicas", "0"], "--replicas must be >= 1"),
    ],
)
def test_ray_flags_refused_in_one_line(flags, needle):
    assert_one_line_error(run("serve", "--ray", *flags), needle)


def test_ray_flags_need_ray():
    assert_one_line_error(run("serve", "--replicas", "2"), "need --ray")


def descendants(pid: int) -> set[int]:
    """Every live process under pid (from /proc)."""
    children: dict[int, list[int]] = {}
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = open(f"/proc/{p}/stat").read()  # noqa: SIM115
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(p))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def alive(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]  # noqa: SIM115
    except OSError:
        return False
    return state != "Z"


@pytest.mark.integration
def test_serve_ray_generate_and_stop(smollm2_converted, tmp_path):
    port, http_port = free_port(), free_port()
    (tmp_path / "token").write_text("ray-cli-t0ken\n")
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115
    server = subprocess.Popen(
        [sys.executable, "-m", "specsplit.faces.cli", "serve", "--ray", "--replicas", "1",
         "--target", "smollm2-135m", "--threads", "1", "--port", str(port),
         "--http-port", str(http_port), "--auth-token-file", str(tmp_path / "token")],
        stdout=log, stderr=log, cwd=ROOT,
    )  # fmt: skip
    try:
        deadline = time.time() + 300
        while "specsplit serving" not in (tmp_path / "serve.log").read_text():
            assert server.poll() is None and time.time() < deadline, (
                tmp_path / "serve.log"
            ).read_text()[-3000:]
            time.sleep(0.5)
        started = descendants(server.pid)
        assert len(started) >= 4  # Ray's processes and the replica
        common = ["Name three colours.", "--max-new-tokens", "16", "--json"]
        auth = ["--auth-token-file", str(tmp_path / "token")]
        edge = run("generate", *common, "--server", f"127.0.0.1:{port}", "--draft", "ngram", *auth)
        cloud = run("generate", *common, "--server", f"127.0.0.1:{port}", "--draft", "none", *auth)
        assert edge.returncode == 0 and cloud.returncode == 0, edge.stderr + cloud.stderr
        a = json.loads(edge.stdout.strip().splitlines()[-1])
        b = json.loads(cloud.stdout.strip().splitlines()[-1])
        assert a["token_ids"] == b["token_ids"] and a["new_tokens"] >= 1
        assert a["reconnects"] == 0 and a["round_trips"] >= 1
        no_key = run("generate", *common, "--server", f"127.0.0.1:{port}", "--draft", "ngram")
        assert_one_line_error(no_key, "UNAUTHENTICATED")
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(120)
    assert code == 0, (tmp_path / "serve.log").read_text()[-3000:]
    assert "shutting down" in (tmp_path / "serve.log").read_text()
    end = time.time() + 30
    while any(alive(p) for p in started) and time.time() < end:
        time.sleep(0.5)
    assert not [p for p in started if alive(p)], "processes the command started outlived it"


def test_plain_serve_and_the_client_never_import_ray():
    code = (
        "import sys, specsplit.faces.cli, specsplit.faces.serve, specsplit.transport.server, "
        "specsplit.transport.client, specsplit.faces.api; "
        "specsplit.faces.cli.build_parser(); print('ray' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "False", out.stderr
