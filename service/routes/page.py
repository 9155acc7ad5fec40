"""`GET /`: a page to try the models (plain HTML, CSS and JS; nothing from outside)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

PAGE = (Path(__file__).resolve().parent.parent / "static" / "index.html").read_text()

router = APIRouter()


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def page() -> HTMLResponse:
    return HTMLResponse(PAGE)
