"""``python -m prunerep``: see :mod:`prunerep.cli`."""
from prunerep.cli import entrypoint

if __name__ == "__main__":
    entrypoint()
