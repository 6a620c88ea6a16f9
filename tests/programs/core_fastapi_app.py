"""A FastAPI app for `uvicorn --workers 2` (seed 002's runtime): /health answers with the
pid of the worker that served it."""

import os

from fastapi import FastAPI

app = FastAPI()


@app.get("/health")
def health() -> dict[str, int]:
    return {"pid": os.getpid(), "master": os.getppid()}
