"""`lucid serve` as a user starts it: a subprocess that binds 127.0.0.1 by default, loads the
default model by its catalogue name, asks for the API key when given one, and stops on Ctrl-C."""

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_lucid_serve_subprocess():
    port = free_port()
    env = dict(os.environ, LUCID_API_KEY="sekret")  # from the environment: keeps the key out of `ps`
    process = subprocess.Popen([sys.executable, "-m", "lucidlm.cli", "serve", "--port", str(port),
                                "--embedding-model", "none"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.ConnectError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)
        assert httpx.get(url + "/v1/models").status_code == 401
        models = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer sekret"}).json()
        assert [m["id"] for m in models["data"]] == ["smollm2-135m-instruct"]
    finally:
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=30)
    assert f"Uvicorn running on http://127.0.0.1:{port}" in output
    assert process.returncode == 0


@pytest.mark.parametrize("port", ["99999", "-1", "0", "http"])
def test_a_port_out_of_range_is_a_usage_error(capsys, port):
    from lucidlm.cli import build_parser

    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["serve", "--port", port])
    assert exit_info.value.code == 2 and "a port is a number from 1 to 65535" in capsys.readouterr().err
