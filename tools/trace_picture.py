"""`python -m tools.trace_picture [--out docs/tracing.png] [--html PATH]`: a picture of a real trace, for
docs/tracing.md. The service (the shipped ViT, on the CPU) serves three classifications sent at once, one
of them carrying a client's `traceparent`; its spans are caught by the OpenTelemetry SDK's in-memory
exporter, and drawn here as a timeline (one request's trace, then the batch run it shared, linked to the
three requests), which headless Chromium renders to a PNG. The project's own drawing of a real trace, not
Jaeger's UI (there is no collector here)."""

from __future__ import annotations

import argparse
import html
import io
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastapi.testclient import TestClient
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from PIL import Image

from service.app import create_app
from service.settings import PROJECT_ROOT, Settings

CHROMIUM = "/usr/bin/chromium"  # Debian's package, as the browser tests use
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
CLIENT_PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"  # the client's span, as a caller sends it
SHOWN = ("http.request.method", "http.route", "http.response.status_code", "vitserve.request_id", "vitserve.model",
         "vitserve.model.version", "vitserve.provider")  # fmt: skip


def traced_spans() -> tuple[ReadableSpan, ...]:
    """Three classifications sent together (one batch run), their spans as the service exported them."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    images = [(PROJECT_ROOT / "examples" / name).read_bytes() for name in ("digit-3.png", "digit-7.png", "digit-3.png")]
    with tempfile.TemporaryDirectory() as folder:
        shutil.copytree(PROJECT_ROOT / "model_repository" / "vit", Path(folder) / "vit")
        policy = {"vit": {"max_batch_size": len(images), "max_queue_delay_ms": 500}}  # the three share a run
        settings = Settings(model_repository=Path(folder), device="cpu", grpc_port=0, batch_policy=policy)
        with TestClient(create_app(settings, tracer_provider=provider)) as client:

            def send(i: int) -> None:
                headers = {"content-type": "image/png", "x-request-id": f"docs-{i + 1}"}
                if i == 0:
                    headers["traceparent"] = CLIENT_PARENT
                response = client.post("/v1/classify?top_k=3", content=images[i], headers=headers)
                assert response.status_code == 200, response.text

            with ThreadPoolExecutor(len(images)) as pool:
                list(pool.map(send, range(len(images))))
    return exporter.get_finished_spans()


def page(spans: tuple[ReadableSpan, ...]) -> str:
    """The timeline as an HTML page: the traced request's spans by depth, then the batch run it linked to."""
    root = next(s for s in spans if s.kind == SpanKind.SERVER and s.attributes and
                s.attributes.get("vitserve.request_id") == "docs-1")  # fmt: skip
    assert root.context is not None and root.start_time is not None and root.end_time is not None
    trace = [s for s in spans if s.context is not None and s.context.trace_id == root.context.trace_id]
    batches = [s for s in spans if s.name.startswith("batch ")]
    start = min(s.start_time or 0 for s in [*trace, *batches])
    end = max(s.end_time or 0 for s in [*trace, *batches])
    scale = 100 / max(end - start, 1)

    def row(span: ReadableSpan, depth: int, colour: str, note: str = "") -> str:
        assert span.start_time is not None and span.end_time is not None
        left, width = (span.start_time - start) * scale, max((span.end_time - span.start_time) * scale, 0.15)
        ms = (span.end_time - span.start_time) / 1e6
        return (f'<div class="row"><div class="name" style="padding-left:{8 + 16 * depth}px">{html.escape(span.name)}'
                f'{note}</div><div class="lane"><div class="bar" style="left:{left:.2f}%;width:{width:.2f}%;'
                f'background:{colour}"></div><span class="ms" style="left:calc({left + width:.2f}% + 4px)">'
                f"{ms:.2f} ms</span></div></div>")  # fmt: skip

    rows = [row(root, 0, "#3b6fb6", ' <span class="kind">server</span>')]
    children = sorted((s for s in trace if s is not root), key=lambda s: (s.start_time or 0, s.end_time or 0))
    for child in children:
        linked = ' <span class="kind">&#8599; linked to the batch run</span>' if child.links else ""
        rows.append(row(child, 1, "#6aa84f" if child.name != "inference" else "#e69138", linked))
    for batch in batches:
        assert batch.context is not None
        note = f' <span class="kind">a trace of its own, {len(batch.links)} links</span>'
        rows.append('<div class="section">the batch run, linked to each of its requests\' spans</div>')
        rows.append(row(batch, 0, "#a64d79", note))
    attributes = root.attributes or {}
    table = "".join(f"<tr><td>{key}</td><td>{html.escape(str(attributes[key]))}</td></tr>" for key in SHOWN
                    if key in attributes)  # fmt: skip
    parent = root.parent
    parent_text = f"{parent.span_id:016x} (remote: the client's traceparent)" if parent else "none"
    return f"""<!doctype html><html><head><meta charset="utf-8"><style>
body {{ font: 13px system-ui, sans-serif; margin: 16px; color: #222; width: 960px; }}
h1 {{ font-size: 15px; margin: 0 0 4px; }} .sub {{ color: #666; margin-bottom: 12px; }}
.row {{ display: flex; border-bottom: 1px solid #eee; height: 24px; align-items: center; }}
.name {{ width: 330px; flex: none; box-sizing: border-box; white-space: nowrap; overflow: hidden; }}
.lane {{ position: relative; flex: 1; height: 100%; }}
.bar {{ position: absolute; top: 6px; height: 12px; border-radius: 2px; }}
.ms {{ position: absolute; top: 4px; font-size: 11px; color: #444; white-space: nowrap; }}
.kind {{ color: #888; font-size: 11px; }} .section {{ margin: 14px 0 4px; color: #666; }}
table {{ margin-top: 12px; border-collapse: collapse; }} td {{ padding: 2px 12px 2px 0; }}
td:first-child {{ color: #666; }} .foot {{ margin-top: 12px; color: #a00; font-size: 11px; }}
</style></head><body>
<h1>Trace {root.context.trace_id:032x}: {html.escape(root.name)}</h1>
<div class="sub">service vitserve &middot; parent span {parent_text} &middot; {len(trace)} spans in this trace</div>
{"".join(rows)}
<table>{table}</table>
<div class="foot">The project's own rendering (tools/trace_picture.py) of spans the service exported in a real run
(OpenTelemetry SDK, in-memory exporter): not Jaeger's UI.</div>
</body></html>"""


def screenshot(page_html: str, out: Path) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            tab = browser.new_page(viewport={"width": 1000, "height": 400})
            tab.set_content(page_html)
            png = tab.screenshot(full_page=True)
        finally:
            browser.close()
    image = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=64)  # a few colours: a small file
    image.save(out, optimize=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "docs" / "tracing.png")
    parser.add_argument("--html", type=Path, help="also write the page drawn")
    args = parser.parse_args(argv)
    drawn = page(traced_spans())
    if args.html:
        args.html.write_text(drawn)
    screenshot(drawn, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
