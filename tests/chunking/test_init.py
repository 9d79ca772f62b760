import subprocess
import sys


def test_importing_chunking_pulls_in_no_io_framework_or_model() -> None:
    probe = (
        "import sys, chunking, chunking.exchange, chunking.splitter, chunking.reassembler; "
        "bad = [m for m in ('asyncio', 'fastapi', 'starlette', 'redis', 'torch', 'websockets', "
        "'transformers', 'socket') if m in sys.modules]; "
        "print(','.join(bad))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == ""


def test_public_names_resolve() -> None:
    import chunking

    missing = [name for name in chunking.__all__ if not hasattr(chunking, name)]
    assert missing == []


def test_the_client_subpackage_is_the_io_layer_and_is_not_loaded_by_the_core() -> None:
    probe = (
        "import sys, chunking; before = 'chunking.client' in sys.modules; "
        "import chunking.client; "
        "print(before, 'websockets' in sys.modules, 'asyncio' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["False", "True", "True"]
