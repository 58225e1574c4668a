"""The dashboard: server-rendered pages at `/` of `serve --transport http`.

- Account → Webhooks (`/webhooks`): a person signs in with an API key. Its scopes and revocation
  are re-read on every request, so a read-only key sees everything and changes nothing.
- A webhook's page (`/webhooks/{id}`): the delivery log with response codes, bodies and retry
  state, "Send test delivery" and "Redeliver".
- The admin area (`/admin`): the operator signs in with JUSTSCAN_ADMIN_PASSWORD. It shows every
  team's webhooks and failing deliveries, and the API key page with each key's MCP switch.

Security, by construction rather than by care in each route:
- The session is a random token in an HttpOnly, SameSite=Strict cookie. Only its hash is
  stored, in the database, so every server process knows it and signing out ends it everywhere.
- Every POST carries the session's CSRF token (the sign-in forms: a double-submit cookie), and a
  cross-origin Origin header is refused.
- Jinja2 autoescapes everything: receivers' response bodies are shown as text.
- Secrets and keys travel only in POST bodies and in the one page that shows a new secret, which
  is never cached. URLs carry ids, filters and notices from a fixed list.
- Every action goes through the same service calls, with the same team isolation and scopes, as
  the REST API and the MCP tools.
"""

from __future__ import annotations

import hmac
import math
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from justscan_mcp.app import App
from justscan_mcp.config import LOOPBACK_NAMES
from justscan_mcp.errors import (
    AuthError,
    Conflict,
    Forbidden,
    InvalidInput,
    JustScanError,
    MissingScope,
    NotFound,
    StoreUnavailable,
    http_status,
)
from justscan_mcp.models import EVENT_NAMES, LIST_LIMIT_MAX, OPEN_STATES, DashboardSession, Principal
from justscan_mcp.retry import DELIVERY_STATES
from justscan_mcp.service.operations import BY_NAME, authorize, invoke
from justscan_mcp.threads import in_thread

HERE = Path(__file__).parent
SESSION_COOKIE = "justscan_session"
LOGIN_CSRF_COOKIE = "justscan_login_csrf"
BODY_PREVIEW = 300  # characters of a response body shown before "show all"

# The only notices a redirect may name; a URL never carries free text.
NOTICES = {
    "created": "Webhook created.",
    "updated": "Webhook saved.",
    "enabled": "Webhook enabled: new events will be delivered.",
    "disabled": "Webhook disabled: queued deliveries were ended and no new ones are made.",
    "deleted": "Webhook deleted.",
    "redelivered": "Redelivery queued: it appears at the top of the log.",
    "recovered": "Webhook enabled: every delivery that failed in its streak is being sent again.",
    "signed-out": "You are signed out.",
    "mcp-on": "MCP turned on for that key.",
    "mcp-off": "MCP turned off for that key.",
    "app-revoked": "App revoked: its tokens no longer work.",
}
CONSENT_NEXT = "/oauth/consent?request="
LIST_FIELDS = ("events", "scopes")  # form fields that may repeat (checkboxes)
SCOPE_TEXT = {
    "webhooks:read": "see your webhooks, their delivery logs and statistics",
    "webhooks:write": "create, change, test and delete webhooks, and re-send deliveries",
}

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # same-origin, not no-referrer: with no-referrer Chromium sends `Origin: null` on our own
    # form posts, which would hide a real cross-site post among them.
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

templates = Environment(
    loader=FileSystemLoader(HERE / "templates"),
    autoescape=select_autoescape(default=True, default_for_string=True),
    trim_blocks=True,
    lstrip_blocks=True,
)
templates.filters["when"] = lambda t: t.strftime("%Y-%m-%d %H:%M:%S UTC") if t else "-"


@dataclass(frozen=True)
class ChartHour:
    """One hour of the webhook page's chart, in SVG units."""

    label: str  # "13:00"
    x: float
    width: float
    ok_y: float
    ok_height: float
    bad_y: float
    bad_height: float
    succeeded: int
    failed: int
    latency_ms: int | None
    tick: bool  # an hour label under the axis


@dataclass(frozen=True)
class Chart:
    width: int
    height: int
    top: int
    base: float  # the y of the axis
    hours: list[ChartHour]
    most: int  # the bar scale's top
    slowest: int | None  # the latency line's scale top (ms)
    line: str  # SVG polyline points of the latency line ("" when no attempt)
    succeeded: int
    failed: int


CHART_WIDTH, CHART_HEIGHT, CHART_TOP, CHART_LEFT, CHART_RIGHT, CHART_BOTTOM = 720, 180, 12, 40, 56, 22


def chart_of(stats: Any) -> Chart:
    """The last hours as stacked bars (succeeded under failed) and a line of mean latency, drawn
    on the server: no script and no chart library."""
    hours = stats.hourly
    plot_w = CHART_WIDTH - CHART_LEFT - CHART_RIGHT
    plot_h = CHART_HEIGHT - CHART_TOP - CHART_BOTTOM
    base = CHART_TOP + plot_h
    most = max([h.succeeded + h.failed for h in hours] + [1])
    slowest = max((h.latency_ms for h in hours if h.latency_ms is not None), default=None)
    slot = plot_w / max(1, len(hours))
    bars, points = [], []
    for i, h in enumerate(hours):
        ok = plot_h * h.succeeded / most
        bad = plot_h * h.failed / most
        x = CHART_LEFT + i * slot
        bars.append(
            ChartHour(
                label=h.hour.strftime("%H:00"),
                x=round(x + slot * 0.15, 1),
                width=round(slot * 0.7, 1),
                ok_y=round(base - ok, 1),
                ok_height=round(ok, 1),
                bad_y=round(base - ok - bad, 1),
                bad_height=round(bad, 1),
                succeeded=h.succeeded,
                failed=h.failed,
                latency_ms=h.latency_ms,
                tick=i % max(1, len(hours) // 4) == 0,
            )
        )
        if h.latency_ms is not None and slowest:
            points.append(f"{x + slot / 2:.1f},{base - plot_h * h.latency_ms / slowest:.1f}")
    return Chart(
        width=CHART_WIDTH,
        height=CHART_HEIGHT,
        top=CHART_TOP,
        base=base,
        hours=bars,
        most=most,
        slowest=slowest,
        line=" ".join(points),
        succeeded=sum(h.succeeded for h in hours),
        failed=sum(h.failed for h in hours),
    )


def rate_limit_of(data: dict[str, Any]) -> Any:
    """The form's rate limit: empty is none; anything but a whole number is passed on as text, so
    the service refuses it naming `rate_limit`."""
    raw = str(data.get("rate_limit") or "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        return raw


def status_of(exc: JustScanError) -> int:
    """The HTTP status of a refused action: the REST API's, from the one table."""
    return http_status(exc)[0]


# Errors an action shows on the page it came from (the form stays filled in); any other error
# is an error page.
SHOWN_ON_PAGE = (InvalidInput, MissingScope, Conflict)


# The actions on one webhook (POST /webhooks/{id}/{action}), each with the operation it runs:
# its scope is that operation's, from the operation table.
WEBHOOK_ACTIONS: dict[str, str] = {
    "edit": "update_webhook",
    "active": "update_webhook",
    "rotate": "rotate_secret",
    "test": "test_webhook",
    "delete": "delete_webhook",
    "enable-recover": "recover_deliveries",
}

# Every dashboard request that acts for a key, and the operation (so the scope) it runs. The
# operation-table test walks this list; a key route missing from it fails that test.
KEY_ROUTES: tuple[tuple[str, str, str], ...] = (
    ("GET", "/webhooks", "list_webhooks"),
    ("POST", "/webhooks", "create_webhook"),
    ("GET", "/webhooks/{webhook_id}", "get_webhook"),
    ("GET", "/webhooks/{webhook_id}/delete", "get_webhook"),
    *(("POST", f"/webhooks/{{webhook_id}}/{action}", op) for action, op in WEBHOOK_ACTIONS.items()),
    ("POST", "/deliveries/{delivery_id}/redeliver", "redeliver"),
)


@dataclass
class Visit:
    """Who is looking at a page: a key's principal (team pages) or the operator (principal None)."""

    session: DashboardSession
    principal: Principal | None
    team_name: str | None = None  # what the header shows instead of the team's bare id

    @property
    def can_write(self) -> bool:
        return self.principal is not None and self.principal.has("webhooks:write")


class LoginThrottle:
    """Failed sign-ins per client address in a sliding window, in this process's memory: enough
    to turn a password guesser's thousands of tries a second into a handful a minute."""

    def __init__(self, *, failures: int = 5, window: float = 60.0, max_addresses: int = 10_000) -> None:
        self.failures = failures
        self.window = window
        self.max_addresses = max_addresses
        self._seen: dict[str, deque[float]] = {}

    def wait(self, address: str, now: float) -> int:
        """Seconds this address must wait before its next try (0: it may try now)."""
        times = self._seen.get(address)
        if not times:
            return 0
        while times and times[0] <= now - self.window:
            times.popleft()
        if len(times) < self.failures:
            return 0
        return max(1, math.ceil(times[0] + self.window - now))

    def succeeded(self, address: str) -> None:
        self._seen.pop(address, None)

    def failed(self, address: str, now: float) -> None:
        if address not in self._seen and len(self._seen) >= self.max_addresses:
            # Forget the addresses that failed longest ago rather than grow without bound.
            for stale in sorted(self._seen, key=lambda a: self._seen[a][-1] if self._seen[a] else 0)[:1000]:
                del self._seen[stale]
        self._seen.setdefault(address, deque()).append(now)


class Dashboard:
    """The dashboard over one `App`: a handler per page and per action, and `routes()`.

    Pages are GET handlers that change nothing; every change is a POST handler that checks the
    CSRF token first. Team pages and actions run operations through `invoke` (`run`), so their
    scopes are the operation table's.
    """

    def __init__(self, app: App) -> None:
        self.app = app
        self.service = app.service
        self.handlers: dict[str, Callable[[Request, Visit, int, dict[str, Any]], Awaitable[Response]]] = {
            "edit": self.edit,
            "active": self.switch,
            "rotate": self.rotate,
            "test": self.test,
            "delete": self.delete,
            "enable-recover": self.enable_recover,
        }
        assert self.handlers.keys() == WEBHOOK_ACTIONS.keys()

    async def run(self, operation: str, v: Visit, **args: Any) -> Any:
        """An operation for the signed-in key, through the same gate as MCP and REST."""
        assert v.principal is not None
        return await invoke(self.service, operation, principal=v.principal, args=args)

    def page(self, request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        notice = NOTICES.get(request.query_params.get("notice", ""))
        html = templates.get_template(name).render(request=request, notice=notice, **context)
        return HTMLResponse(html, status_code=status, headers=SECURITY_HEADERS)

    def redirect(self, path: str, **query: Any) -> RedirectResponse:
        q = {k: v for k, v in query.items() if v not in (None, "")}
        return RedirectResponse(path + (f"?{urlencode(q)}" if q else ""), status_code=303)

    def cross_origin(self, request: Request) -> bool:
        # Defence in depth behind the token: a browser names the page's origin on a POST. An
        # opaque "null" origin (privacy settings, sandboxed frames) is left to the token, which
        # such a page cannot have.
        origin = request.headers.get("origin")
        if not origin or origin == "null":
            return False
        return urlsplit(origin).netloc != request.headers.get("host", "")

    def set_session(self, response: Response, request: Request, token: str) -> None:
        response.set_cookie(
            SESSION_COOKIE,
            token,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            path="/",
        )

    async def visit(self, request: Request) -> Visit | None:
        try:
            session, principal = await in_thread(
                self.service.dashboard_session, request.cookies.get(SESSION_COOKIE)
            )
        except AuthError:
            return None
        if principal is None:
            return Visit(session, None)
        return Visit(session, principal, await in_thread(self.service.team_name, principal.team_id))

    async def form_of(self, request: Request, v: Visit | None) -> dict[str, Any] | Response:
        """The POSTed form, after the CSRF and Origin checks."""
        form = await request.form()
        data = {k: form.getlist(k) if k in LIST_FIELDS else form.get(k) for k in form}
        expected = v.session.csrf_token if v else request.cookies.get(LOGIN_CSRF_COOKIE, "")
        given = str(data.get("csrf") or "")
        if self.cross_origin(request) or not expected or not hmac.compare_digest(given, expected):
            return self.page(
                request,
                "error.html",
                403,
                visit=v,
                title="Refused",
                message="This form expired or came from another site. Reload the page and try again.",
            )
        return data

    def failure(self, request: Request, v: Visit | None, exc: JustScanError) -> HTMLResponse:
        if isinstance(exc, StoreUnavailable):
            return self.page(request, "error.html", 503, visit=v, title="Unavailable", message=exc.PUBLIC)
        return self.page(
            request, "error.html", status_of(exc), visit=v, title="That did not work", message=exc.message
        )

    def guarded(
        self, handler: Callable[[Request, Visit], Awaitable[Response]], *, operator: bool
    ) -> Callable[[Request], Awaitable[Response]]:
        """A page for a key session (team pages) or for the operator (admin pages); anyone else
        is sent to the matching sign-in, and service errors become an error page."""

        async def wrapped(request: Request) -> Response:
            v = None
            try:
                v = await self.visit(request)
                if v is None:
                    return self.redirect("/admin/login" if operator else "/login")
                if (v.principal is None) != operator:
                    return self.redirect("/admin/login" if operator else "/admin")
                return await handler(request, v)
            except JustScanError as exc:  # the session lookup too: an outage is a 503 page
                return self.failure(request, v, exc)

        return wrapped

    def webhook_id(self, request: Request) -> int:
        raw = request.path_params["webhook_id"]
        if not raw.isdigit():
            raise NotFound("webhook_id", f"webhook {raw} does not exist in this team")
        return int(raw)

    # --- signing in and out -----------------------------------------------------------------

    def login_form(
        self, request: Request, template: str, status: int = 200, error: str | None = None, next: str = ""
    ) -> Response:
        token = secrets.token_urlsafe(32)
        response = self.page(request, template, status, visit=None, csrf=token, error=error, next=next)
        response.set_cookie(
            LOGIN_CSRF_COOKIE, token, httponly=True, samesite="strict", secure=request.url.scheme == "https"
        )
        return response

    async def home(self, request: Request) -> Response:
        v = await self.visit(request)
        if v is None:
            return self.redirect("/login")
        return self.redirect("/webhooks" if v.principal is not None else "/admin")

    def sign_in_form(self, template: str) -> Callable[[Request], Awaitable[Response]]:
        async def route(request: Request) -> Response:
            return self.login_form(request, template)

        return route

    def sign_in_route(
        self,
        template: str,
        field: str,
        sign_in: Callable[[str], tuple[str, Any]],
        landing: str,
        throttle: LoginThrottle | None = None,
    ) -> Callable[[Request], Awaitable[Response]]:
        """The POST of a sign-in form: check its credential (`field`) and start a session. With a
        throttle, an address with too many recent failures gets 429 before anything is checked."""

        async def route(request: Request) -> Response:
            address = request.client.host if request.client else "?"
            wait = throttle.wait(address, time.monotonic()) if throttle else 0
            if wait:
                response = self.login_form(
                    request, template, 429, error=f"too many failed sign-ins; try again in {wait} s"
                )
                response.headers["Retry-After"] = str(wait)
                return response
            data = await self.form_of(request, None)
            if isinstance(data, Response):
                return data
            # Only back to a consent request: any other target would make this an open redirect.
            nxt = str(data.get("next") or "")
            nxt = nxt if nxt.startswith(CONSENT_NEXT) else ""
            try:
                token, _ = await in_thread(sign_in, str(data.get(field) or ""))
            except AuthError as exc:
                if throttle:
                    throttle.failed(address, time.monotonic())
                return self.login_form(request, template, 401, error=exc.message, next=nxt)
            except StoreUnavailable as exc:
                return self.login_form(request, template, 503, error=exc.PUBLIC, next=nxt)
            if throttle:
                throttle.succeeded(address)
            response = self.redirect(nxt or landing)
            self.set_session(response, request, token)
            response.delete_cookie(LOGIN_CSRF_COOKIE)
            return response

        return route

    async def logout(self, request: Request) -> Response:
        v = await self.visit(request)
        if v is not None:
            data = await self.form_of(request, v)
            if isinstance(data, Response):
                return data
            await in_thread(self.service.end_dashboard_session, request.cookies.get(SESSION_COOKIE))
        response = self.redirect("/login", notice="signed-out")
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    # --- Account → Webhooks -----------------------------------------------------------------

    async def webhooks_get(self, request: Request, v: Visit) -> Response:
        return await self.webhook_list(request, v)

    async def webhook_create(self, request: Request, v: Visit) -> Response:
        data = await self.form_of(request, v)
        if isinstance(data, Response):
            return data
        try:
            created = await self.run(
                "create_webhook",
                v,
                url=str(data.get("url") or "").strip(),
                events=data.get("events") or [],
                description=str(data.get("description") or ""),
                rate_limit=rate_limit_of(data),
            )
        except SHOWN_ON_PAGE as exc:
            return await self.webhook_list(request, v, status=status_of(exc), error=exc, form=data)
        return self.page(
            request, "secret.html", 201, visit=v, webhook=created, secret=created.secret, rotated=False
        )

    async def webhook_list(
        self,
        request: Request,
        v: Visit,
        *,
        status: int = 200,
        error: JustScanError | None = None,
        form: dict[str, Any] | None = None,
    ) -> Response:
        assert v.principal is not None
        cursor = request.query_params.get("cursor") or None
        listed = await self.run("list_webhooks", v, cursor=cursor, limit=LIST_LIMIT_MAX)
        summaries = await in_thread(self.service.with_last_delivery, listed.webhooks)
        next_cursor = listed.next_cursor
        return self.page(
            request,
            "webhooks.html",
            status,
            visit=v,
            webhooks=summaries,
            next_cursor=next_cursor,
            events=EVENT_NAMES,
            error=error,
            form=form or {},
        )

    async def webhook_detail(
        self,
        request: Request,
        v: Visit,
        *,
        outcome: Any = None,
        status: int = 200,
        error: JustScanError | None = None,
    ) -> Response:
        assert v.principal is not None
        wid = self.webhook_id(request)
        hook = await self.run("get_webhook", v, webhook_id=wid)
        state = request.query_params.get("state") or None
        event = request.query_params.get("event") or None
        cursor = request.query_params.get("cursor") or None
        log = await self.run(
            "list_deliveries", v, webhook_id=wid, state=state, event=event, cursor=cursor, limit=50
        )
        live = any(d.state in OPEN_STATES for d in log.deliveries)
        stats = await self.run("get_webhook_stats", v, webhook_id=wid, hours=24)
        return self.page(
            request,
            "webhook.html",
            status,
            visit=v,
            webhook=hook,
            log=log,
            live=live,
            stats=stats,
            chart=chart_of(stats),
            state=state,
            event=event,
            states=DELIVERY_STATES,
            events=(*EVENT_NAMES, "test"),
            all_events=EVENT_NAMES,
            outcome=outcome,
            error=error,
            preview=BODY_PREVIEW,
        )

    async def webhook_get(self, request: Request, v: Visit) -> Response:
        return await self.webhook_detail(request, v)

    # --- actions on one webhook: one handler each, found by name (POST only) ------------------

    async def edit(self, request: Request, v: Visit, wid: int, data: dict[str, Any]) -> Response:
        changes = {
            "url": str(data.get("url") or "").strip(),
            "events": data.get("events") or [],
            "description": str(data.get("description") or ""),
            "rate_limit": rate_limit_of(data),
        }
        await self.run("update_webhook", v, webhook_id=wid, **changes)
        return self.redirect(f"/webhooks/{wid}", notice="updated")

    async def switch(self, request: Request, v: Visit, wid: int, data: dict[str, Any]) -> Response:
        on = data.get("active") == "true"
        await self.run("update_webhook", v, webhook_id=wid, active=on)
        return self.redirect(f"/webhooks/{wid}", notice="enabled" if on else "disabled")

    async def rotate(self, request: Request, v: Visit, wid: int, data: dict[str, Any]) -> Response:
        rotated = await self.run("rotate_secret", v, webhook_id=wid)
        hook = await self.run("get_webhook", v, webhook_id=wid)
        return self.page(
            request, "secret.html", 200, visit=v, webhook=hook, secret=rotated.secret, rotated=rotated
        )

    async def test(self, request: Request, v: Visit, wid: int, data: dict[str, Any]) -> Response:
        outcome = await self.run("test_webhook", v, webhook_id=wid)
        return await self.webhook_detail(request, v, outcome=outcome)

    async def delete(self, request: Request, v: Visit, wid: int, data: dict[str, Any]) -> Response:
        await self.run("delete_webhook", v, webhook_id=wid)
        return self.redirect("/webhooks", notice="deleted")

    async def enable_recover(self, request: Request, v: Visit, wid: int, data: dict[str, Any]) -> Response:
        assert v.principal is not None
        await in_thread(self.service.enable_and_recover, principal=v.principal, webhook_id=wid)
        return self.redirect(f"/webhooks/{wid}", notice="recovered")

    async def webhook_action(self, request: Request, v: Visit) -> Response:
        name = request.path_params["action"]
        if name not in self.handlers:
            raise NotFound("action", f"no such action: {name}")
        wid = self.webhook_id(request)
        data = await self.form_of(request, v)
        if isinstance(data, Response):
            return data
        try:
            assert v.principal is not None
            # Refused by the operation's declared scope before anything is read or changed; the
            # handler's `invoke` checks the same declaration again.
            authorize(BY_NAME[WEBHOOK_ACTIONS[name]], v.principal)
            return await self.handlers[name](request, v, wid, data)
        except SHOWN_ON_PAGE as exc:
            try:
                return await self.webhook_detail(request, v, status=status_of(exc), error=exc)
            except JustScanError:
                # The page cannot be drawn for this key (no such webhook, no read scope): the
                # refusal itself is still what the person must see.
                return self.failure(request, v, exc)

    async def confirm_delete(self, request: Request, v: Visit) -> Response:
        assert v.principal is not None
        hook = await self.run("get_webhook", v, webhook_id=self.webhook_id(request))
        return self.page(request, "confirm_delete.html", visit=v, webhook=hook)

    async def redeliver(self, request: Request, v: Visit) -> Response:
        assert v.principal is not None
        data = await self.form_of(request, v)
        if isinstance(data, Response):
            return data
        raw = request.path_params["delivery_id"]
        if not raw.isdigit():
            raise NotFound("delivery_id", f"delivery {raw} does not exist in this team")
        copy = await self.run("redeliver", v, delivery_id=int(raw))
        return self.redirect(f"/webhooks/{copy.webhook_id}", notice="redelivered")

    # --- the admin area ---------------------------------------------------------------------

    def page_position(self, request: Request, name: str) -> int | None:
        raw = request.query_params.get(name)
        if raw is None or raw == "":
            return None
        if not raw.isdigit():
            raise InvalidInput(name, "must be a page position from a Next link")
        return int(raw)

    async def admin(self, request: Request, v: Visit) -> Response:
        overview = await in_thread(
            self.service.admin_overview,
            webhooks_after=self.page_position(request, "webhooks_after") or 0,
            failing_before=self.page_position(request, "failing_before"),
        )
        names = {t.id: t.name for t in overview.teams}
        apps = await in_thread(self.service.connected_apps, team_id=None, limit=100)
        confirmations = await in_thread(self.service.recent_confirmations, limit=100)
        ops = await in_thread(self.service.operations_status)
        return self.page(
            request,
            "admin.html",
            visit=v,
            overview=overview,
            names=names,
            preview=BODY_PREVIEW,
            apps=apps,
            confirmations=confirmations,
            ops=ops,
        )

    async def admin_app_revoke(self, request: Request, v: Visit) -> Response:
        data = await self.form_of(request, v)
        if isinstance(data, Response):
            return data
        raw = request.path_params.get("grant_id", "")
        if not raw.isdigit():
            raise NotFound("grant_id", f"connected app {raw} does not exist")
        await in_thread(self.service.revoke_connected_app, grant_id=int(raw), team_id=None)
        return self.redirect("/admin", notice="app-revoked")

    async def admin_keys(self, request: Request, v: Visit) -> Response:
        listing = await in_thread(
            self.service.admin_keys, teams_after=self.page_position(request, "teams_after") or 0
        )
        return self.page(
            request, "admin_keys.html", visit=v, teams=listing.teams, keys=listing.keys, listing=listing
        )

    async def admin_key_switch(self, request: Request, v: Visit) -> Response:
        data = await self.form_of(request, v)
        if isinstance(data, Response):
            return data
        raw = request.path_params.get("key_id", "")
        if not raw.isdigit():
            raise NotFound("key", f"API key {raw} does not exist")
        on = data.get("mcp_enabled") == "true"
        await in_thread(self.service.update_api_key, key_id=int(raw), mcp_enabled=on)
        return self.redirect("/admin/keys", notice="mcp-on" if on else "mcp-off")

    # --- OAuth consent and connected apps ----------------------------------------------------

    async def consent_get(self, request: Request) -> Response:
        """The consent step of the OAuth sign-in: who asks, where the answer goes, which scopes.
        Without a key session, the sign-in form first, which comes back here."""
        handle = request.query_params.get("request", "")
        v = None
        try:
            v = await self.visit(request)
            if v is None or v.principal is None:
                if SESSION_COOKIE not in request.cookies and request.query_params.get("again") != "1":
                    # The session cookie is SameSite=Strict, so the browser leaves it out of this
                    # navigation, which an app on another site started. Loading the page again
                    # from this origin sends it (and a person with no session signs in below).
                    return HTMLResponse(
                        '<!doctype html><meta http-equiv="refresh" content="0;url='
                        f'{CONSENT_NEXT}{quote(handle)}&amp;again=1"><title>Connecting…</title>',
                        headers=SECURITY_HEADERS,
                    )
                return self.login_form(request, "login.html", next=f"{CONSENT_NEXT}{quote(handle)}")
            return await self._consent_page(request, v, handle)
        except JustScanError as exc:
            return self.failure(request, v, exc)

    async def _consent_page(
        self, request: Request, v: Visit, handle: str, *, status: int = 200, error: str | None = None
    ) -> Response:
        assert v.principal is not None
        consent = await in_thread(self.service.consent, handle)
        target = urlsplit(consent.redirect_uri)
        offered = [s for s in ("webhooks:read", "webhooks:write") if v.principal.has(s)]
        wanted = [s for s in consent.scopes if s in offered] or offered
        response = self.page(
            request,
            "consent.html",
            status,
            visit=v,
            consent=consent,
            handle=handle,
            offered=offered,
            wanted=wanted,
            scope_text=SCOPE_TEXT,
            redirect_host=target.netloc,
            redirect_local=(target.hostname or "") in LOOPBACK_NAMES,
            error=error,
        )
        # The answer is a redirect to the app: let this page's form lead there.
        origin = f"{target.scheme}://{target.netloc}"
        response.headers["Content-Security-Policy"] = SECURITY_HEADERS["Content-Security-Policy"].replace(
            "form-action 'self'", f"form-action 'self' {origin}"
        )
        return response

    async def consent_post(self, request: Request) -> Response:
        v = None
        try:
            v = await self.visit(request)
            if v is None or v.principal is None:
                return self.redirect("/login")
            data = await self.form_of(request, v)
            if isinstance(data, Response):
                return data
            handle = str(data.get("request") or "")
            if data.get("decision") == "approve":
                try:
                    uri, code, state = await in_thread(
                        self.service.approve_authorization,
                        principal=v.principal,
                        handle=handle,
                        scopes=[str(x) for x in data.get("scopes") or []],
                    )
                except (InvalidInput, Forbidden) as exc:
                    return await self._consent_page(
                        request, v, handle, status=status_of(exc), error=exc.message
                    )
                params = {"code": code, "state": state, "iss": self.issuer}
            else:
                uri, state = await in_thread(self.service.deny_authorization, handle)
                params = {
                    "error": "access_denied",
                    "error_description": "the person declined",
                    "state": state,
                    "iss": self.issuer,
                }
            query = urlencode({k: v for k, v in params.items() if v is not None})
            sep = "&" if urlsplit(uri).query else "?"
            return RedirectResponse(
                f"{uri}{sep}{query}", status_code=303, headers={"Cache-Control": "no-store"}
            )
        except JustScanError as exc:
            return self.failure(request, v, exc)

    async def apps(self, request: Request, v: Visit) -> Response:
        assert v.principal is not None
        listed = await in_thread(self.service.connected_apps, team_id=v.principal.team_id)
        return self.page(request, "apps.html", visit=v, apps=listed)

    async def app_revoke(self, request: Request, v: Visit) -> Response:
        assert v.principal is not None
        data = await self.form_of(request, v)
        if isinstance(data, Response):
            return data
        if not v.can_write:
            raise MissingScope("webhooks:write", "revoking a connected app")
        raw = request.path_params.get("grant_id", "")
        if not raw.isdigit():
            raise NotFound("grant_id", f"connected app {raw} does not exist")
        await in_thread(self.service.revoke_connected_app, grant_id=int(raw), team_id=v.principal.team_id)
        return self.redirect("/apps", notice="app-revoked")

    @property
    def issuer(self) -> str:
        """The authorization server's identifier (RFC 9207 `iss` on the redirect back)."""
        return self.service.oauth_resource.removesuffix("/mcp")

    def routes(self) -> list[BaseRoute]:
        """The dashboard's routes, for the HTTP server to mount at `/`."""
        # GET and POST are separate routes: a page never changes anything, and every change is a
        # POST that carries the CSRF token.
        return [
            Route("/", self.home, methods=["GET"]),
            Route("/login", self.sign_in_form("login.html"), methods=["GET"]),
            Route(
                "/login",
                self.sign_in_route("login.html", "api_key", self.service.sign_in_with_key, "/webhooks"),
                methods=["POST"],
            ),
            Route("/logout", self.logout, methods=["POST"]),
            Route("/webhooks", self.guarded(self.webhooks_get, operator=False), methods=["GET"]),
            Route("/webhooks", self.guarded(self.webhook_create, operator=False), methods=["POST"]),
            Route("/webhooks/{webhook_id}", self.guarded(self.webhook_get, operator=False), methods=["GET"]),
            Route(
                "/webhooks/{webhook_id}/delete",
                self.guarded(self.confirm_delete, operator=False),
                methods=["GET"],
            ),
            Route(
                "/webhooks/{webhook_id}/{action}",
                self.guarded(self.webhook_action, operator=False),
                methods=["POST"],
            ),
            Route(
                "/deliveries/{delivery_id}/redeliver",
                self.guarded(self.redeliver, operator=False),
                methods=["POST"],
            ),
            Route("/oauth/consent", self.consent_get, methods=["GET"]),
            Route("/oauth/consent", self.consent_post, methods=["POST"]),
            Route("/apps", self.guarded(self.apps, operator=False), methods=["GET"]),
            Route("/apps/{grant_id}/revoke", self.guarded(self.app_revoke, operator=False), methods=["POST"]),
            Route("/admin/login", self.sign_in_form("admin_login.html"), methods=["GET"]),
            Route(
                "/admin/login",
                self.sign_in_route(
                    "admin_login.html", "password", self.service.sign_in_operator, "/admin", LoginThrottle()
                ),
                methods=["POST"],
            ),
            Route("/admin", self.guarded(self.admin, operator=True), methods=["GET"]),
            Route("/admin/keys", self.guarded(self.admin_keys, operator=True), methods=["GET"]),
            Route(
                "/admin/apps/{grant_id}/revoke",
                self.guarded(self.admin_app_revoke, operator=True),
                methods=["POST"],
            ),
            Route(
                "/admin/keys/{key_id}/mcp",
                self.guarded(self.admin_key_switch, operator=True),
                methods=["POST"],
            ),
            Mount("/static", app=StaticFiles(directory=HERE / "static"), name="static"),
        ]


def build_dashboard(app: App) -> list[BaseRoute]:
    """The dashboard's routes, for the HTTP server to mount at `/`."""
    return Dashboard(app).routes()
