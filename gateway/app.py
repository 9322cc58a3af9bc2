"""The gateway's app factory: settings, database, blob store, engine and runner built per app."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from gateway import errors
from gateway.jobwatch import JobNotifier
from gateway.limits import BodyLimit
from gateway.metrics import HttpMetrics
from gateway.ratelimit import FailedAuthLimiter
from gateway.requestid import RequestId
from gateway.routers import admin, credits, health, openai_compat, transcriptions
from gateway.runners import JobRunner, LocalJobRunner
from gateway.services import Services
from gateway.uploads import UploadSlots
from transcriber.engines import Engine, build_engine, default_concurrency
from transcriber.pipeline import Pipeline
from transcription import metrics
from transcription.blobstore import open_blob_store
from transcription.db.migrate import upgrade
from transcription.db.session import Database
from transcription.lifecycle import Lifecycle
from transcription.settings import GatewaySettings

log = logging.getLogger(__name__)

#: The routes that stream an upload to disk under their own limits (gateway.uploads).
UPLOAD_ROUTES = frozenset({("POST", "/v1/transcriptions"), ("POST", "/v1/audio/transcriptions")})


def build_services(
    settings: GatewaySettings, engine: Engine | None = None, *, exclusive: bool = False
) -> Services:
    """Everything the routes use; ``exclusive`` says this process holds the data directory's
    lock, so with SQLite no other process can hold job leases."""
    settings.ensure_data_dir()
    db = Database(settings.resolved_database_url())
    if settings.migrate_on_start:
        upgrade(db.engine)
    blobs = open_blob_store(settings.resolved_blob_url())
    notifier = JobNotifier()
    lc = Lifecycle(db, blobs, on_change=notifier.notify)
    runner: JobRunner
    engine_name: str
    model_name: str | None
    if settings.runner == "kubernetes":
        # Jobs run in the cluster's transcriber pods; the gateway needs no Whisper engine.
        from gateway.runners.kubernetes import KubernetesJobRunner

        runner = KubernetesJobRunner(
            lc, namespace=settings.kubernetes_namespace, timeout=settings.kubernetes_timeout
        )
        engine_name, model_name = settings.engine, settings.model
    else:
        concurrency = settings.concurrency or default_concurrency()
        engine = engine or build_engine(settings, concurrency=concurrency)
        pipeline = Pipeline(blobs, engine, progress_interval=settings.progress_interval)
        runner = LocalJobRunner(
            pipeline,
            lc,
            concurrency=concurrency,
            lease_seconds=settings.lease_seconds,
            max_attempts=settings.max_attempts,
            exclusive=exclusive and _database_in(db, settings.data_dir),
        )
        engine_name, model_name = engine.name, engine.model
    services = Services(
        settings=settings,
        db=db,
        blobs=blobs,
        lifecycle=lc,
        notifier=notifier,
        runner=runner,
        code_key=settings.code_key(),
        engine_name=engine_name,
        model_name=model_name,
        uploads=UploadSlots(total=settings.max_uploads, per_code=settings.max_uploads_per_code),
        auth_limiter=FailedAuthLimiter(
            settings.auth_failure_limit,
            settings.auth_failure_window_seconds,
            settings.auth_failure_delay,
        ),
    )
    services.upload_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    return services


def _database_in(db: Database, data_dir: Path) -> bool:
    """Whether the database is a SQLite file inside ``data_dir``, which the lock guards."""
    path = db.engine.url.database
    return (
        db.is_sqlite
        and path is not None
        and Path(path).absolute().is_relative_to(data_dir.absolute())
    )


def create_app(
    settings: GatewaySettings | None = None,
    *,
    engine: Engine | None = None,
    exclusive: bool = False,
) -> FastAPI:
    """A gateway app; nothing is built until the app starts (its lifespan)."""
    settings = settings or GatewaySettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services = build_services(settings, engine, exclusive=exclusive)
        app.state.services = services
        services.runner.start()
        unregister_metrics = metrics.register_database_collector(services.db)
        try:
            yield
        finally:
            unregister_metrics()
            services.runner.stop()
            services.db.dispose()

    app = FastAPI(
        title="Whisper transcription service",
        version="0.1.0",
        description="Upload an mp3 with a prepaid credit code; get a transcript back.",
        lifespan=lifespan,
    )
    errors.install(app)
    if settings.trusted_proxies:
        # The client address behind the load balancer, from the X-Forwarded-For entries that
        # trusted proxies appended; the failed-auth limit counts against it.
        app.add_middleware(ProxyHeadersMiddleware, trusted_hosts=settings.trusted_proxies)
    if settings.max_body_bytes or settings.body_timeout:
        # Added after the others that read requests, so it runs before them: a body is bounded
        # before anything else reads it.
        app.add_middleware(
            BodyLimit,
            max_bytes=settings.max_body_bytes,
            timeout=settings.body_timeout,
            uploads=UPLOAD_ROUTES,
        )
    # Outside the limits, so the requests they refuse are counted too.
    app.add_middleware(HttpMetrics)
    # Around all the others, so every answer (a refusal too) carries the request's ID, as does
    # every line logged while serving it.
    app.add_middleware(RequestId)
    for module in (transcriptions, openai_compat, credits, admin, health):
        app.include_router(module.router)

    @app.get("/", include_in_schema=False, response_class=HTMLResponse)
    def index() -> str:
        return resources.files("gateway").joinpath("static/index.html").read_text()

    return app
