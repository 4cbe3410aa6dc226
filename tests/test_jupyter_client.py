"""try-image's Jupyter client against a real Jupyter server on the host: the stranger check,
the token, the login form with a password hashed the way the first-boot wizard hashes it, a
kernel started over REST and a cell run over its websocket."""

from __future__ import annotations

import secrets
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import local_jupyter

from builder import jupyter_client as jupyter
from builder.firstboot.answers import hash_jupyter_password

pytestmark = pytest.mark.slow
PASSWORD = "jupyter pässword \"$(true)\""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    token = secrets.token_hex(24)
    hashed = hash_jupyter_password(PASSWORD, sys.executable)
    with local_jupyter(tmp_path_factory.mktemp("server"), "server", token,
                       f"--PasswordIdentityProvider.hashed_password={hashed}") as (url, _):
        yield url, token


def test_strangers_are_refused_even_after_the_token_was_used(server: tuple[str, str]) -> None:
    url, token = server
    assert jupyter.wait_until_up(url, 30) < 30
    jupyter.refuses_strangers(url)
    jupyter.token_works(url, token)
    # Jupyter answers a token with a login cookie: the next "stranger" must not carry it.
    jupyter.refuses_strangers(url)
    with pytest.raises(jupyter.JupyterError, match="token was refused"):
        jupyter.token_works(url, "wrong")


def test_an_open_server_is_reported(tmp_path: Path) -> None:
    with local_jupyter(tmp_path, "server", "",
                       "--IdentityProvider.token=", "--ServerApp.password=",
                       "--ServerApp.disable_check_xsrf=True") as (url, _), \
            pytest.raises(jupyter.JupyterError, match="open to anyone"):
        jupyter.refuses_strangers(url)


def test_the_wizards_password_hash_logs_in_and_a_cell_runs(server: tuple[str, str]) -> None:
    url, _ = server
    session = jupyter.Session(url)
    try:
        with pytest.raises(jupyter.JupyterError, match="password failed"):
            jupyter.Session(url).login("not the password")
        session.login(PASSWORD)
        kernel = session.start_kernel()
        result = session.execute(kernel, "import os\nprint(6 * 7, os.getpid() > 0)", 120)
        assert result.stdout == "42 True\n"
        with pytest.raises(jupyter.JupyterError, match="ZeroDivisionError"):
            session.execute(kernel, "1 / 0", 120)
        session.stop_kernel(kernel)
    finally:
        session.close()


def test_stack_answers_are_checked() -> None:
    good = ('TRY-IMAGE {"det": 5.0, "quad": 9.000000000000002, "area": 7.0, "sympy": "9", '
            '"pandas": 10, "png": "89504e47", "user": "jupyter"}\n')
    assert jupyter.check_stack_output("noise\n" + good)["user"] == "jupyter"
    with pytest.raises(jupyter.JupyterError, match=r"area = 6\.0"):
        jupyter.check_stack_output(good.replace('"area": 7.0', '"area": 6.0'))
    with pytest.raises(jupyter.JupyterError, match="printed no result"):
        jupyter.check_stack_output("Traceback ...")


def test_a_silent_kernel_meets_the_cells_limit_while_jupyter_pings(tmp_path: Path) -> None:
    """Jupyter pings its websockets (every 30 s by default, every 0.3 s here) and the client
    library answers pings inside its own receive loop: a kernel that says nothing must still
    end at the cell's limit, not when it finally speaks."""
    config = tmp_path / "pings.py"
    config.write_text("c.ServerApp.tornado_settings = {'ws_ping_interval': 300}\n")
    (tmp_path / "server").mkdir()
    with local_jupyter(tmp_path / "server", "server", "pinged",
                       f"--config={config}") as (url, _):
        session = jupyter.Session(url)
        try:
            session.http.headers["Authorization"] = "token pinged"
            kernel = session.start_kernel()
            assert session.execute(kernel, "print('up')", 120).stdout == "up\n"
            started = time.monotonic()
            with pytest.raises(jupyter.JupyterError, match="did not finish in 3 s"):
                session.execute(kernel, "import time\ntime.sleep(30)", 3)
            assert time.monotonic() - started < 10
            session.stop_kernel(kernel)
        finally:
            session.close()
