import subprocess
import sys


def test_importing_chunking_pulls_in_no_io_framework_or_model() -> None:
    probe = (
        "import sys, chunking; "
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
