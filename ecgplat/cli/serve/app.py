"""The FastAPI app of `ecgplat serve`: the routes, their scopes, the one-line errors, the page.

Routes (OpenAPI at /openapi.json, documented at /docs):

* ``GET /health``: no token; whether the gallery is served, its size, reloads, what is loaded;
* ``POST /query`` (scope ``query``): a record ``key`` of the store or an uploaded ECG (``files``:
  a record's files or one zip) -> the top-``k`` gallery neighbours, cosine scores, store keys and
  same-patient flags where the gallery knows the patient;
* ``POST /embed`` (``query``): a key or an upload -> its embedding;
* ``POST /predict`` (``predict``): a key or an upload -> what `ecgplat predict` answers for it;
* ``GET /records`` (``records``): record keys to pick from; ``GET /records/{key}``: a record's
  metadata without identifiers; ``/records/{key}/trace``: its first 5 s as numbers;
  ``/records/{key}/plot.png``: its 12-lead plot;
* ``GET /``: the web page (``ecgplat/cli/serve/static``).

Every error is ``{"error": "<one line>"}`` with a 4xx/5xx status; an unexpected one is a 500
whose line names no data (the log has its type and place). Patient keys and raw identifiers are
never returned: same-patient flags are computed on the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from pathlib import Path
from typing import Annotated

import anyio
import numpy as np
from fastapi import Depends, FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from ecgplat.cli.apps import describe_error
from ecgplat.cli.serve import answers
from ecgplat.cli.serve.answers import Refused
from ecgplat.cli.serve.guards import AccessLog, BodyLimit, TimeLimit
from ecgplat.cli.serve.settings import ServeSettings
from ecgplat.cli.serve.state import Gallery, ServiceState
from ecgplat.cli.serve.tokens import Caller, RateLimiter, TokenTable
from ecgplat.cli.serve.uploads import Upload, UploadError, UploadLimits, read_upload

log = logging.getLogger("ecgplat.serve")
STATIC = Path(__file__).parent / "static"
TRACE_STEP = 2  # /trace sends every 2nd sample of the 500 Hz segment (250 Hz): enough to see


def _fail(status: int, message: str, headers: dict | None = None) -> HTTPException:
    return HTTPException(status, " ".join(str(message).split()), headers=headers)


def _errors(app: FastAPI) -> None:
    def body(message: str) -> dict:
        return {"error": " ".join(str(message).split()) or "error"}

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse(body(exc.detail), exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return JSONResponse(body(f"{where or 'request'}: {first.get('msg', 'invalid')}"), 422)

    @app.exception_handler(UploadError)
    async def bad_upload(request: Request, exc: UploadError):
        return JSONResponse(body(str(exc)), exc.status)

    @app.exception_handler(Refused)
    async def refused(request: Request, exc: Refused):
        return JSONResponse(body(exc.message), exc.status)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        message, expected = describe_error(exc)
        if expected:  # ecgplat's own one-line diagnosis (a file, a lineage, ...)
            return JSONResponse(body(message), 422)
        log.error("%s", message)
        return JSONResponse(body("internal error; the service log has its type and place"), 500)


def _require(tokens: TokenTable, limiter: RateLimiter, scope: str):
    """The dependency of a route of `scope`: 401 without a valid token, 403 without the scope,
    429 past the caller's rate."""

    async def caller(request: Request) -> Caller:
        who = tokens.caller(request.headers.get("authorization"))
        if who is None:
            raise _fail(401, "a valid bearer token is required", {"WWW-Authenticate": "Bearer"})
        request.state.caller = who.name
        if scope not in who.scopes:
            raise _fail(403, f"this token has no {scope!r} scope")
        wait = limiter.take(who)
        if wait > 0:
            raise _fail(
                429,
                f"rate limit of {who.rate:g} requests/s exceeded",
                {"Retry-After": str(max(1, math.ceil(wait)))},
            )
        return who

    return caller


class Service:
    """What the routes share: the settings, the loaded state, the callers, the worker threads."""

    def __init__(self, settings: ServeSettings, state: ServiceState):
        self.settings, self.state = settings, state
        self.tokens = TokenTable(settings.tokens, settings.rate, settings.burst)
        self.limiter = RateLimiter()
        self.workers = anyio.CapacityLimiter(settings.threads)
        self.limits = UploadLimits(
            settings.max_unpacked_bytes, settings.max_zip_members, settings.max_record_seconds
        )
        self.need = {
            s: Depends(_require(self.tokens, self.limiter, s))
            for s in ("query", "predict", "records")
        }

    async def work(self, fn, *args):
        """`fn(*args)` in a worker thread (at most `settings.threads` at once)."""
        return await anyio.to_thread.run_sync(fn, *args, limiter=self.workers)

    def gallery(self) -> Gallery:
        snap = self.state.gallery
        if snap is None:
            raise _fail(503, self.state.error or "no gallery index is served (start with --index)")
        return snap

    def model(self):
        if self.state.model is None:
            raise _fail(503, "no embedding model is loaded (start with --index or --checkpoint)")
        return self.state.model

    def store(self):
        """The open store of the current gallery snapshot, else the store opened now."""
        snap = self.state.gallery
        if snap is not None:
            return snap.lookup
        from ecgplat.store import open_store

        return _ScanLookup(open_store(self.settings.store))

    async def upload(self, files: list[UploadFile] | None, fs: float | None, leads: str | None):
        from ingestion.readers.options import ReadOptions

        try:
            opts = ReadOptions(fs=fs, leads=leads)
        except ValueError as e:
            raise _fail(422, str(e)) from None
        pairs = [(f.filename, f.file) for f in files or []]
        up = await self.work(read_upload, pairs, self.limits, opts)
        return up

    def check_k(self, k: int) -> int:
        if not 1 <= k <= self.settings.max_k:
            raise _fail(422, f"k must be between 1 and {self.settings.max_k}")
        return k


class _ScanLookup:
    """`RecordLookup.record` and `.store` for a service without a gallery (a scan per call)."""

    def __init__(self, store):
        self.store = store

    def record(self, key: str) -> int:
        hits = np.flatnonzero((self.store.column("record_key") == key) & self.store.live)
        if len(hits) == 0:
            raise KeyError(f"no record {key!r}")
        return int(hits[0])


def _one_of(key: str | None, files: list[UploadFile] | None) -> None:
    if (key is None) == (not files):
        raise _fail(422, "give exactly one of a record key ('key') or uploaded files ('files')")


Key = Annotated[str | None, Form(description="A record key of the store, e.g. ptbxl/00013.")]
Files = Annotated[
    list[UploadFile] | None,
    File(description="One record's files (e.g. .hea + .mat), one vendor file, or one zip."),
]
Fs = Annotated[float | None, Form(description="numpy uploads: sampling rate, Hz.")]
Leads = Annotated[str | None, Form(description="numpy uploads: comma-separated lead names.")]


def create_app(settings: ServeSettings, state: ServiceState | None = None) -> FastAPI:
    """The app serving `settings` (the state is loaded here unless given)."""
    state = state or ServiceState(settings)
    svc = Service(settings, state)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        async def watch() -> None:
            while True:
                await asyncio.sleep(settings.reload_interval)
                await anyio.to_thread.run_sync(state.poll)

        task = asyncio.create_task(watch())
        try:
            yield
        finally:
            task.cancel()

    app = FastAPI(
        title="ecgplat",
        summary="Similar-ECG queries, predictions, embeddings and records of a feature store.",
        version="1",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.service = state
    _errors(app)
    _health_route(app, svc)
    _retrieval_routes(app, svc)
    _predict_route(app, svc)
    _explain_route(app, svc)
    _record_routes(app, svc)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    _docs(app)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    return _wrap(app, settings)


def _health_route(app: FastAPI, svc: Service) -> None:
    state = svc.state

    @app.get("/health", tags=["service"])
    async def health() -> dict:
        """Whether the service answers queries, and what it has loaded (no token needed)."""
        snap = state.gallery
        index = None
        if snap is not None:
            index = {
                "rows": len(snap.index),
                "kind": snap.index.kind,
                "deltas": snap.index.seq,
                "uid": snap.index.uid,
                "loaded_at": snap.loaded_at,
            }
        return {
            "status": "ok" if state.error is None else "degraded",
            "index": index,
            "error": state.error,
            "reloads": state.reloads,
            "embed": state.model is not None,
            "predict": state.predictor is not None,
            "explain": state.explainer is not None,
            "classes": list(state.predictor.task["classes"]) if state.predictor else None,
            "auth": svc.tokens.required,
            "max_upload_bytes": svc.settings.max_upload_bytes,
            "max_k": svc.settings.max_k,
        }


def _retrieval_routes(app: FastAPI, svc: Service) -> None:
    state = svc.state

    @app.post("/query", tags=["retrieval"])
    async def query(
        caller: Caller = svc.need["query"],
        key: Key = None,
        files: Files = None,
        k: Annotated[int, Form(description="Number of neighbours.")] = 5,
        trace: Annotated[bool, Form(description="Include the upload's first 5 s.")] = False,
        fs: Fs = None,
        leads: Leads = None,
    ) -> dict:
        """The top-k gallery neighbours of a stored record or an uploaded ECG: rank, store key,
        cosine score, and same_patient where the gallery knows both patients."""
        from retrieval.query import query_record, query_signal

        _one_of(key, files)
        svc.check_k(k)
        snap = svc.gallery()
        t0 = time.perf_counter()
        out: dict = {}
        if key is not None:
            try:
                matches = await svc.work(query_record, snap.index, key, k, snap.lookup)
            except KeyError as e:
                raise _fail(404, describe_error(e)[0]) from None
            out["query"] = {"key": key}
        else:
            up: Upload = await svc.upload(files, fs, leads)
            label = state.patient_key(up.patient_id)
            up.patient_id = None
            model = svc.model()
            matches = await svc.work(
                lambda: query_signal(
                    snap.index, up.segments, up.lead_mask, k, model=model, label=label
                )
            )
            out["query"] = answers.upload_info(up)
            if trace:
                out["query"]["trace"] = answers.trace(up.segments[0], up.lead_mask)
        out["matches"] = [answers.match(m) for m in matches]
        out["index"] = {"rows": len(snap.index), "uid": snap.index.uid}
        out["ms"] = round((time.perf_counter() - t0) * 1000, 2)
        return out

    @app.post("/embed", tags=["retrieval"])
    async def embed(
        caller: Caller = svc.need["query"],
        key: Key = None,
        files: Files = None,
        fs: Fs = None,
        leads: Leads = None,
    ) -> dict:
        """The embedding of a stored record (as stored) or of an uploaded ECG (embedded with
        the gallery's checkpoint, lead set and precision)."""
        from retrieval.query import embed_signal

        _one_of(key, files)
        model = svc.model()
        snap = state.gallery
        lineage = snap.index.lineage if snap is not None else {}
        leads_used = lineage.get("leads", "12")
        if key is not None:
            try:
                vector = await svc.work(svc.gallery().lookup.embedding, key)
            except KeyError as e:
                raise _fail(404, describe_error(e)[0]) from None
        else:
            up = await svc.upload(files, fs, leads)
            up.patient_id = None
            precision = lineage.get("precision", svc.settings.precision)
            vector = await svc.work(
                lambda: embed_signal(
                    model, up.segments, up.lead_mask, leads_used, svc.settings.device, precision
                )
            )
        return {
            "dim": int(len(vector)),
            "embedding": [float(v) for v in np.asarray(vector, dtype=np.float32)],
            "lineage": {
                "checkpoint_sha256": model.sha256,
                "leads": leads_used,
                "normalize": model.normalize,
            },
        }


def _predict_route(app: FastAPI, svc: Service) -> None:
    state = svc.state

    @app.post("/predict", tags=["prediction"])
    async def predict(
        caller: Caller = svc.need["predict"],
        key: Key = None,
        files: Files = None,
        fs: Fs = None,
        leads: Leads = None,
    ) -> dict:
        """Per-class probabilities and thresholded labels (or regression values) of a stored
        record or an uploaded ECG, as `ecgplat predict` gives them (same checkpoint thresholds,
        normalisation and lead subset)."""
        _one_of(key, files)
        predictor = state.predictor
        if predictor is None:
            raise _fail(503, "no prediction model is loaded (start with --checkpoint)")
        if key is not None:
            segments, mask = await svc.work(answers.stored_record, svc.store(), key)
        else:
            up = await svc.upload(files, fs, leads)
            up.patient_id = None
            segments, mask = up.segments, up.lead_mask
        row = await svc.work(answers.predict, predictor, key or "upload", segments, mask)
        return {"task": answers.task_summary(predictor), "prediction": row}


def _explain_route(app: FastAPI, svc: Service) -> None:
    state = svc.state

    @app.post("/explain", tags=["prediction"])
    async def explain(
        caller: Caller = svc.need["predict"],
        key: Key = None,
        files: Files = None,
        finding: Annotated[
            str, Form(alias="class", description="The class (or CinC abbreviation) to explain.")
        ] = "",
        fs: Fs = None,
        leads: Leads = None,
    ) -> dict:
        """Which leads and moments of the record's first 5 s drove one output of the prediction
        model (Integrated Gradients, `ecgplat explain`): per-lead shares and the attribution per
        lead at 250 Hz, scaled to [-1, 1] (positive raised the output)."""
        _one_of(key, files)
        if state.explainer is None:
            raise _fail(503, "no attribution model is loaded (start with --checkpoint)")
        if key is not None:
            segments, mask = await svc.work(answers.stored_record, svc.store(), key, 1)
        else:
            up = await svc.upload(files, fs, leads)
            up.patient_id = None
            segments, mask = up.segments, up.lead_mask
        return await svc.work(answers.explain, state.explainer, segments, mask, finding)


def _record_routes(app: FastAPI, svc: Service) -> None:
    need = svc.need["records"]

    @app.get("/records", tags=["records"])
    async def records(
        caller: Caller = need,
        q: Annotated[str, Query(max_length=200, description="Part of the key to match.")] = "",
        split: Annotated[str | None, Query(description="ident split: gallery or probe.")] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 200,
    ) -> dict:
        """Record keys of the store to pick from (live records only)."""
        return await svc.work(answers.list_records, svc.store().store, q, split, limit)

    @app.get("/records/{key:path}/plot.png", tags=["records"], response_class=Response)
    async def record_plot(key: str, caller: Caller = need) -> Response:
        """The record's 12-lead plot (its first 5 s)."""
        png = await svc.work(answers.plot, svc.store(), key)
        return Response(png, media_type="image/png")

    @app.get("/records/{key:path}/trace", tags=["records"])
    async def record_trace(key: str, caller: Caller = need) -> dict:
        """The record's first 5 s: 12 leads in mV at 250 Hz (what the page draws)."""
        segments, mask = await svc.work(answers.stored_record, svc.store(), key, 1)
        return answers.trace(segments[0], mask)

    @app.get("/records/{key:path}", tags=["records"])
    async def record(key: str, caller: Caller = need) -> dict:
        """A record's metadata, without identifiers (no patient key, no file path)."""
        return await svc.work(answers.metadata, svc.store(), key)


def _docs(app: FastAPI) -> None:
    """/docs: Swagger UI from the swagger-ui-bundle package (no CDN: nothing is fetched)."""
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:  # the page then links to /openapi.json only
        return
    app.mount("/docs-assets", StaticFiles(directory=swagger_ui_path), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs():
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="ecgplat API",
            swagger_js_url="/docs-assets/swagger-ui-bundle.js",
            swagger_css_url="/docs-assets/swagger-ui.css",
            swagger_favicon_url="/docs-assets/favicon-32x32.png",
        )


def _wrap(app: FastAPI, settings: ServeSettings):
    """The middleware, innermost first: CORS (only when origins are configured), the body
    cap, the time limit, the access log."""
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization"],
        )
    app.add_middleware(BodyLimit, limit=settings.max_upload_bytes)
    app.add_middleware(TimeLimit, seconds=settings.request_timeout)
    app.add_middleware(AccessLog)
    return app
