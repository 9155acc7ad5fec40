"""`python -m service [--host H] [--port N]`: serve the model repository with uvicorn."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import uvicorn

from service.app import create_app
from service.settings import Settings


def main(argv: list[str] | None = None) -> None:
    settings = Settings()
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__)
    parser.add_argument("--host", default=settings.host, help=f"address to bind (default {settings.host})")
    parser.add_argument("--port", type=int, default=settings.port, help=f"port (default {settings.port})")
    parser.add_argument("--model-repository", type=Path, default=settings.model_repository, help="model repository")
    args = parser.parse_args(argv)
    settings = settings.model_copy(
        update={"host": args.host, "port": args.port, "model_repository": args.model_repository}
    )
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level)


if __name__ == "__main__":
    main()
