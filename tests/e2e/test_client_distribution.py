"""The client distribution as a user gets it: both wheels built from this repository, the
client's installed alone into a fresh virtualenv (no torch, no server), and its commands run
against a real server."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import venv
import zipfile
from email.parser import Parser
from pathlib import Path

import orjson
import pytest
from packaging.requirements import Requirement

from tests.conftest import RunningServer
from tests.support.pyclient_media import distinct_colors, hex_of, solid_png, write_video

ROOT = Path(__file__).resolve().parents[2]
CLIENT_PROJECT = tomllib.loads((ROOT / "chunking" / "pyproject.toml").read_text())["project"]
(CLIENT_CAMERA_OPENCV,) = CLIENT_PROJECT["optional-dependencies"]["camera"]
SERVER_PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
BUILD_S = 180
INSTALL_S = 300
COMMAND_S = 60
NOT_IN_THE_CLIENT = ("torch", "transformers", "fastapi", "uvicorn", "redis", "pillow",
                     "starlette", "prometheus-client")


def copy_tree(source: Path, target: Path) -> None:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(
        "__pycache__", "*.egg-info", "build", "dist", "node_modules"))


def build(project: Path, out: Path, *flags: str) -> list[Path]:
    """``python -m build`` with this environment's setuptools (no isolation: no download)."""
    subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out),
                    *flags, str(project)], check=True, capture_output=True, timeout=BUILD_S)
    return sorted(out.iterdir())


def wheel_metadata(wheel: Path) -> tuple[list[str], dict[str, list[str]]]:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (meta,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        message = Parser().parsestr(archive.read(meta).decode())
    return names, {key: message.get_all(key) or [] for key in ("Requires-Dist", "Name")}


@pytest.fixture(scope="module")
def client_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The client built from a copy of chunking/ alone: an sdist, then a wheel from it."""
    work = tmp_path_factory.mktemp("client-build")
    copy_tree(ROOT / "chunking", work / "chunking")
    built = build(work / "chunking", work / "dist")
    assert sorted(p.suffix for p in built) == [".gz", ".whl"]
    (wheel,) = [p for p in built if p.suffix == ".whl"]
    return wheel


@pytest.fixture(scope="module")
def client_venv(client_wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv holding the client wheel and its camera extra, nothing else."""
    root = tmp_path_factory.mktemp("client-venv")
    venv.EnvBuilder(with_pip=True).create(root)
    subprocess.run([str(root / "bin" / "python"), "-m", "pip", "install", "--quiet",
                    "--disable-pip-version-check", f"{client_wheel}[camera]"],
                   check=True, capture_output=True, timeout=INSTALL_S)
    return root


def run_in(venv_root: Path, command: str, *args: str, cwd: Path
           ) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("PIXELSTREAM_", "PYTHON", "VIRTUAL_ENV"))}
    env["PATH"] = f"{venv_root / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run([str(venv_root / "bin" / command), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=COMMAND_S)


def test_the_client_wheel_holds_the_core_and_the_client_and_no_server(client_wheel: Path
                                                                      ) -> None:
    names, meta = wheel_metadata(client_wheel)
    packages = {name.split("/")[0] for name in names if not name.startswith("pixelstream_")}
    assert packages == {"chunking"}
    assert "chunking/client/upload.py" in names
    assert "chunking/exchange.py" in names
    assert "chunking/py.typed" in names
    assert not [n for n in names if n.endswith(("pyproject.toml", "README.md"))]
    requires = [Requirement(text) for text in meta["Requires-Dist"]]
    plain = sorted(r.name for r in requires if not r.marker)
    extras = sorted(r.name for r in requires if r.marker and "camera" in str(r.marker))
    assert plain == ["httpx", "orjson", "pybase64", "websockets"]
    assert extras == ["opencv-python-headless"]


def test_the_server_wheel_depends_on_the_client_and_opencv_only_for_its_ocr(
        tmp_path: Path) -> None:
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, tmp_path / name)
    copy_tree(ROOT / "server", tmp_path / "server")
    (wheel,) = build(tmp_path, tmp_path / "dist", "--wheel")
    names, meta = wheel_metadata(wheel)
    assert not [n for n in names if n.startswith("chunking/")]
    assert "server/static/index.html" in names
    requires = {Requirement(text).name: Requirement(text) for text in meta["Requires-Dist"]
                if "extra ==" not in text}
    pin = requires["pixelstream-client"]
    assert pin.specifier.contains(CLIENT_PROJECT["version"])
    # rapidocr (the ocr task's engine) needs OpenCV: the server names the headless build,
    # below 5 like the client's camera extra, so that one OpenCV is installed, never two.
    opencv = requires["opencv-python-headless"]
    assert not opencv.specifier.contains("5.0")
    assert opencv.specifier == Requirement(CLIENT_CAMERA_OPENCV).specifier
    assert "opencv-python" not in requires
    # The server itself reads no camera: no module of it imports OpenCV.
    assert not [p for p in (ROOT / "server").rglob("*.py") if "import cv2" in p.read_text()]


def test_a_fresh_environment_with_the_client_has_no_torch_and_no_server(client_venv: Path,
                                                                        tmp_path: Path) -> None:
    listed = run_in(client_venv, "python", "-m", "pip", "list", "--format=json", cwd=tmp_path)
    installed = {item["name"].lower() for item in orjson.loads(listed.stdout)}
    assert "pixelstream-client" in installed
    assert "opencv-python-headless" in installed  # the [camera] extra
    assert not installed & set(NOT_IN_THE_CLIENT)
    assert "pixelstream" not in installed
    probe = run_in(client_venv, "python", "-c", "import server", cwd=tmp_path)
    assert probe.returncode != 0


def test_the_installed_client_uploads_and_streams_to_a_real_server(
    client_venv: Path, colors_server: RunningServer, tmp_path: Path
) -> None:
    colors = distinct_colors(3)
    images = []
    for index, color in enumerate(colors):
        path = tmp_path / f"photo{index}.png"
        path.write_bytes(solid_png(color, pad=300_000, seed=7000 + index))
        images.append(path)
    url = colors_server.ws_url

    upload = run_in(client_venv, "pixelstream-client", "upload", *map(str, images), "--url", url,
                    "--json", cwd=tmp_path)
    assert upload.returncode == 0, upload.stderr
    lines = [orjson.loads(line) for line in upload.stdout.splitlines()]
    assert {line["file"]: line["result"]["colors"][0]["hex"] for line in lines} == {
        str(path): hex_of(color) for path, color in zip(images, colors, strict=True)}

    # The same command under the server's name, which a client alone also installs.
    again = run_in(client_venv, "pixelstream", "upload", str(images[0]), "--url", url, "--json",
                   cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert orjson.loads(again.stdout)["cached"] is True
    serve = run_in(client_venv, "pixelstream", "serve", cwd=tmp_path)
    assert serve.returncode == 2
    assert "server is not installed" in serve.stderr

    video = write_video(tmp_path / "clip.avi", distinct_colors(8))
    camera = run_in(client_venv, "pixelstream-client", "camera", "--source", str(video),
                    "--url", url, "--fps", "0", "--json", cwd=tmp_path)
    assert camera.returncode == 0, camera.stderr
    events = [orjson.loads(line) for line in camera.stdout.splitlines()]
    summary = events[-1]
    assert summary["type"] == "summary"
    assert summary["frames_sent"] == 8
    assert summary["results"] >= 1
    assert summary["results"] + summary["dropped"] == 8

    http = run_in(client_venv, "pixelstream-client", "analyze", str(images[1]), "--http",
                  "--url", colors_server.http_url, cwd=tmp_path)
    assert http.returncode == 0, http.stderr
    assert orjson.loads(http.stdout)["result"]["colors"][0]["hex"] == hex_of(colors[1])
