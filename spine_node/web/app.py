"""The FastAPI application: status pages, overlay thumbnails, login, feedback and replay.

Pages are rendered on the server with Jinja2 (``spine_node/web/templates``). Every page needs
the access token when ``web.token_file`` is set (:mod:`spine_node.web.auth`); requests that
change state need it always, plus the session's CSRF token when made by a browser.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from spine_node.config import Settings
from spine_node.feedback import FeedbackEntry, FeedbackSource, Verdict, parse_label
from spine_node.labels import LESION_LABELS, display_label
from spine_node.metrics import BundleInfo
from spine_node.spool import relative_name
from spine_node.store import FeedbackLog, JobStore, StudyCursor, UnknownImage
from spine_node.web import pages
from spine_node.web.auth import CSRF_FIELD, SESSION_COOKIE, Guard
from spine_node.web.files import OutsideDataDir, PngCache, inside, overlay_png, patient_name
from spine_node.web.operations import add_operations_routes

logger = logging.getLogger(__name__)

#: Longest side of an overlay thumbnail, pixels.
THUMBNAIL_SIDE = 240


@dataclass
class WebContext:
    """What the application reads: settings, the open queue, the bundle and the guard.

    Attributes
    ----------
    settings : Settings
        Validated settings.
    store : JobStore
        The open queue database (shared with the other roles of the process, if any).
    guard : Guard
        Token, session and CSRF checks.
    bundle : dict or None
        The configured bundle's ``name``, ``version``, ``demo``, ``sha256`` (None: none).
    nav : list of (str, str)
        The navigation bar: (title, path); routers added later append to it.
    """

    settings: Settings
    store: JobStore
    guard: Guard
    bundle: dict[str, Any] | None = None
    nav: list[tuple[str, str]] = field(
        default_factory=lambda: [("Status", "/"), ("Studies", "/studies")]
    )
    thumbnails: PngCache = field(default_factory=lambda: PngCache(512))


def templates_dir() -> Path:
    """The packaged Jinja2 templates."""
    return Path(str(resources.files("spine_node.web") / "templates"))


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def _score(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _make_templates() -> Jinja2Templates:
    templates = Jinja2Templates(directory=str(templates_dir()))
    templates.env.filters["ago"] = _ago
    templates.env.filters["when"] = _when
    templates.env.filters["score"] = _score
    templates.env.filters["quote"] = lambda s: quote(str(s), safe="")
    templates.env.filters["lesion"] = lambda s: display_label(str(s))
    return templates


class Viewer:
    """Who is asking: ``session`` (cookie value) when logged in by a browser, ``bearer`` True
    for an API client with the token; both empty when no token is configured."""

    def __init__(self, session: str | None, bearer: bool) -> None:
        self.session = session
        self.bearer = bearer


def create_app(
    settings: Settings,
    store: JobStore,
    *,
    guard: Guard | None = None,
    bundle: dict[str, Any] | None = None,
    bundle_info: BundleInfo | None = None,
) -> FastAPI:
    """Build the web application over an open queue.

    Parameters
    ----------
    settings : Settings
        Validated settings (``[web]`` and the data directory).
    store : JobStore
        The open queue; not closed by the application.
    guard : Guard, optional
        Token, session and CSRF checks (default: no token, read-only pages).
    bundle : dict, optional
        The configured bundle's name, version, demo flag and SHA-256 (shown on the page).
    bundle_info : BundleInfo, optional
        The configured, verified bundle for the metrics, readiness and drift monitoring
        (:func:`spine_node.node.bundle_info`; None: no bundle, ``/readyz`` says so).

    Returns
    -------
    fastapi.FastAPI
        ``app.state.web`` holds the :class:`WebContext`.
    """
    if not isinstance(settings, Settings):
        raise TypeError(f"settings must be Settings, got {type(settings).__name__}")
    if guard is None:
        guard = Guard(token=None, max_age_s=settings.web.session_max_age_s)
    ctx = WebContext(settings=settings, store=store, guard=guard, bundle=bundle)
    templates = _make_templates()
    app = FastAPI(title="spine-node", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.web = ctx

    def viewer(request: Request) -> Viewer:
        """The authenticated viewer; a browser without a session is sent to the login."""
        if not guard.enabled:
            return Viewer(None, False)
        authorization = request.headers.get("authorization")
        if authorization is not None:
            if guard.bearer_ok(authorization):
                return Viewer(None, True)
            raise HTTPException(401, "invalid token", headers={"WWW-Authenticate": "Bearer"})
        session = request.cookies.get(SESSION_COOKIE)
        if guard.session_ok(session):
            return Viewer(session, False)
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise HTTPException(303, "login needed",
                            headers={"Location": f"/login?next={quote(target, safe='')}"})

    def render(request: Request, name: str, who: Viewer, **context: Any) -> HTMLResponse:
        csrf = guard.csrf_token(who.session) if who.session else ""
        return templates.TemplateResponse(
            request,
            name,
            {
                "nav": ctx.nav,
                "bundle": ctx.bundle,
                "can_change": guard.enabled,
                "logged_in": who.session is not None,
                "csrf_field": CSRF_FIELD,
                "csrf": csrf,
                "show_patient_names": settings.web.show_patient_names,
                "now": time.time(),
                **context,
            },
            headers={"Cache-Control": "no-store"},
        )

    def names_of(studies: list[dict[str, Any]]) -> dict[str, str | None]:
        """Patient names by study, read from a received file (only when shown)."""
        if not settings.web.show_patient_names:
            return {}
        found: dict[str, str | None] = {}
        for study in studies:
            uid = study["study_instance_uid"]
            found[uid] = None
            for item in study["spool_paths"]:
                try:
                    path = inside(settings.spool_dir, item, settings.data_dir)
                except OutsideDataDir:
                    continue
                found[uid] = patient_name(path)
                if found[uid]:
                    break
        return found

    @app.get("/", response_class=HTMLResponse)
    def status_page(request: Request) -> HTMLResponse:
        who = viewer(request)
        report = pages.overview(settings, store)
        recent = pages.recent_studies(store, 10,
                                      commitment_destinations=settings.commitment_destinations)
        return render(request, "status.html", who, report=report, studies=recent,
                      names=names_of(recent))

    @app.get("/studies", response_class=HTMLResponse)
    def studies_page(request: Request, page: int = 1, before: str | None = None,
                     after: str | None = None) -> HTMLResponse:
        who = viewer(request)
        per_page = settings.web.recent_studies
        total = store.count_studies()
        pages_total = max(1, math.ceil(total / per_page))
        page = min(max(page, 1), pages_total)
        try:
            cursor_before = StudyCursor.from_text(before) if before else None
            cursor_after = StudyCursor.from_text(after) if after else None
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        has_newer = True
        if cursor_after is not None:  # the "newer" link: the page just newer than the cursor
            found = [c.study_instance_uid
                     for c in store.study_page(per_page + 1, after=cursor_after)]
            if len(found) <= per_page:  # nothing newer beyond: the newest page
                found, page, has_newer = store.recent_study_uids(per_page + 1), 1, False
            else:
                found = [*found[1:], cursor_after.study_instance_uid]  # and one to say "older"
        elif cursor_before is not None:  # the "older" link: as cheap deep as on top (keyset)
            found = [c.study_instance_uid
                     for c in store.study_page(per_page + 1, before=cursor_before)]
        else:  # page=N by offset: the newest pages, bookmarks
            found = store.recent_study_uids(per_page + 1, (page - 1) * per_page)
            has_newer = page > 1
        page = max(page, 2) if has_newer else page  # the number is only shown
        recent = pages.studies_view(store, found[:per_page], settings.commitment_destinations)
        older = bool(recent) and len(found) > per_page
        newer = has_newer and bool(recent)
        shown = [im.sop_instance_uid for study in recent for im in study["images"]]
        return render(request, "studies.html", who, studies=recent, page=page,
                      pages_total=pages_total, total=total, names=names_of(recent),
                      feedback=FeedbackLog(store).latest(shown),
                      older=_cursor(recent[-1]) if older else None,
                      newer=_cursor(recent[0]) if newer else None)

    @app.get("/studies/{study_uid}", response_class=HTMLResponse)
    def study_page(request: Request, study_uid: str) -> HTMLResponse:
        who = viewer(request)
        found = pages.one_study(store, study_uid, settings.commitment_destinations)
        if found is None:
            raise HTTPException(404, "no such study")
        given = FeedbackLog(store).entries(study_instance_uid=study_uid)
        latest = {e.sop_instance_uid: e for e in given}
        lesions = [(label, display_label(label)) for label in LESION_LABELS]
        return render(request, "study.html", who, study=found, names=names_of([found]),
                      feedback=latest, history=given, lesions=lesions)

    @app.get("/overlay/{sop_uid}.png")
    def overlay(request: Request, sop_uid: str) -> Response:
        viewer(request)
        objects = store.result_objects(sop_uid)
        key = "|".join(objects)  # a new analysis (reprocess) has new objects: a new thumbnail
        cached = ctx.thumbnails.get(key) if objects else None
        if cached is None:
            cached = _overlay_for(ctx, objects)
            if cached is None:
                raise HTTPException(404, "no overlay for this image")
            ctx.thumbnails.put(key, cached)
        return Response(cached, media_type="image/png",
                        headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/login", response_class=HTMLResponse)
    def login_form(request: Request, next: str = "/") -> HTMLResponse:
        return templates.TemplateResponse(
            request, "login.html",
            {"nav": [], "bundle": ctx.bundle, "next": _local(next), "error": None,
             "enabled": guard.enabled, "logged_in": False},
            headers={"Cache-Control": "no-store"},
        )

    @app.post("/login", response_model=None)
    async def login(request: Request) -> Response:
        form = await request.form()
        target = _local(str(form.get("next", "/")))
        if not guard.enabled or not guard.token_ok(str(form.get("token", ""))):
            logger.warning("web: login refused from %s",
                           request.client.host if request.client else "?")
            return templates.TemplateResponse(
                request, "login.html",
                {"nav": [], "bundle": ctx.bundle, "next": target, "enabled": guard.enabled,
                 "logged_in": False,
                 "error": "wrong token" if guard.enabled else "no token is configured"},
                status_code=401 if guard.enabled else 403,
                headers={"Cache-Control": "no-store"},
            )
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(
            SESSION_COOKIE, guard.new_session(), max_age=int(settings.web.session_max_age_s),
            httponly=True, samesite="strict", secure=request.url.scheme == "https", path="/",
        )
        return response

    async def changer(request: Request) -> tuple[Viewer, Any]:
        """Authenticate a state-changing request and check its CSRF token; returns the viewer
        and the submitted form."""
        if not guard.enabled:
            raise HTTPException(403, "changing state through the web page needs "
                                     "web.token_file (docs/security.md)")
        origin = request.headers.get("origin")
        if origin is not None and origin != f"{request.url.scheme}://{request.url.netloc}":
            raise HTTPException(403, "cross-origin request refused")
        form = await request.form()
        authorization = request.headers.get("authorization")
        if authorization is not None:
            if not guard.bearer_ok(authorization):
                raise HTTPException(401, "invalid token",
                                    headers={"WWW-Authenticate": "Bearer"})
            return Viewer(None, True), form
        session = request.cookies.get(SESSION_COOKIE)
        if not guard.session_ok(session):
            raise HTTPException(401, "log in first")
        if not guard.csrf_ok(session, str(form.get(CSRF_FIELD, ""))):
            raise HTTPException(403, "missing or wrong CSRF token: reload the page")
        return Viewer(session, False), form

    @app.post("/logout", response_model=None)
    async def logout(request: Request) -> Response:
        await changer(request)
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    @app.post("/feedback", response_model=None)
    async def feedback(request: Request) -> Response:
        who, form = await changer(request)
        sop_uid = str(form.get("sop_instance_uid", ""))
        try:
            verdict = Verdict(str(form.get("verdict", "")))
            disagree = verdict is Verdict.DISAGREE  # the label and lesion go with disagree
            entry = FeedbackEntry(
                sop_instance_uid=sop_uid,
                study_instance_uid="?",  # the received image's study is stored
                verdict=verdict,
                corrected_label=parse_label(str(form.get("corrected_label", "")))
                if disagree else None,
                lesion=(str(form.get("lesion", "")) or None) if disagree else None,
                reader=str(form.get("reader", ""))[:128],
                comment=str(form.get("comment", ""))[:2000],
                source=FeedbackSource.WEB,
            )
            stored = FeedbackLog(store).record(entry)
        except UnknownImage as exc:
            raise HTTPException(404, str(exc.args[0])) from None
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        logger.info("web: feedback %d recorded (%s)", stored.feedback_id, stored.verdict.value)
        if who.bearer:
            return JSONResponse(stored.to_json(), status_code=201)
        target = f"/studies/{quote(stored.study_instance_uid, safe='')}#{quote(sop_uid, safe='')}"
        return RedirectResponse(target, status_code=303)

    @app.post("/replay", response_model=None)
    async def replay(request: Request) -> Response:
        _, form = await changer(request)
        what = str(form.get("what", ""))
        if what not in ("jobs", "sends"):
            raise HTTPException(422, f"what must be jobs or sends, got {what!r}")
        raw = str(form.get("id", ""))
        if not raw.isdigit():
            raise HTTPException(422, f"id must be a number, got {raw!r}")
        from spine_node.store import Monitor

        ident = int(raw)
        replayable = ("dead",) if what == "sends" else ("dead", "failed")
        state = Monitor(store).states_of(what, (ident,)).get(ident)
        if state not in replayable:
            raise HTTPException(409, f"{what[:-1]} {ident} is {state or 'unknown'}, "
                                     f"not {' or '.join(replayable)}; not requeued")
        n = store.replay(what, (ident,))
        logger.info("web: replay %s %d requeued %d", what, ident, n)
        return RedirectResponse("/", status_code=303)

    # /metrics, /healthz, /readyz and the /monitoring page (spine_node/web/operations.py)
    add_operations_routes(app, settings, store, bundle=bundle_info, viewer=viewer, render=render,
                          nav=ctx.nav)
    return app


def _cursor(study: dict[str, Any]) -> str:
    """The keyset cursor of a study as :func:`pages.studies_view` shows it."""
    return StudyCursor(study["last_arrival"], study["study_instance_uid"]).to_text()


def _local(target: str) -> str:
    """Only a path on this server may be a redirect target (no open redirect)."""
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//"):
        return "/"
    return target


def _overlay_for(ctx: WebContext, objects: list[str]) -> bytes | None:
    """The overlay thumbnail of an image: the first Secondary Capture among its result
    ``objects`` (SOP Instance UIDs), read from the outbox (None when there is none or it is no
    longer kept)."""
    settings = ctx.settings
    for uid in objects:
        try:
            path = inside(settings.outbox_dir, relative_name(uid), settings.data_dir)
        except OutsideDataDir as exc:
            logger.warning("web: overlay refused: %s", exc)
            continue
        if not path.is_file():
            continue
        try:
            png = overlay_png(path, THUMBNAIL_SIDE)
        except Exception as exc:  # a damaged object: no thumbnail, the page still loads
            logger.warning("web: overlay %s not rendered: %s", path.name, exc)
            continue
        if png is not None:
            return png
    return None
