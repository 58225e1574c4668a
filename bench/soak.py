"""The chaos soak: every fault at once on PostgreSQL, then exact accounting.

    JUSTSCAN_TEST_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres \\
        .venv/bin/python bench/soak.py --seconds 300     # a full run (CI runs --seconds 45)

What runs: 2 `serve --transport http --no-dispatcher` processes and 3 `worker`s on one fresh
PostgreSQL database, and a receiver farm on 127.0.0.1 whose endpoints answer at random with 2xx,
4xx, 5xx, 3xx, an answer slower than the timeout, no answer at all, a NUL byte, invalid UTF-8 or a
connection reset; one more endpoint is a black hole (accepts, never answers). Events are posted
through both servers the whole time. Meanwhile webhooks are deactivated, re-enabled, rotated and
deleted through the REST API; one worker is SIGKILLed and restarted, one is SIGTERMed and
restarted, and PostgreSQL is stopped once (pg_ctlcluster) until a worker logs the outage, then
started again. The retry schedule is short.

When the traffic stops and the queue drains, it checks and prints:
- every delivery of a surviving webhook is final (succeeded or failed), none open;
- each delivery's attempt numbers are 1..n without gaps or repeats, n <= 4;
- the receiver saw each (delivery, attempt) at most once, except attempts in flight at the
  SIGKILL (sent again after their lease: at least once);
- events accepted (202) = events stored, and every stored event has exactly one delivery per
  surviving webhook that was active and subscribed when it was recorded (moments when a webhook
  was being switched are not judged);
- no process logged an unhandled exception, and no log holds a key or webhook secret it made;
- the workers logged the PostgreSQL outage and their recovery from it, and a takeover of the
  SIGKILLed worker's deliveries whenever the receiver saw an attempt of it again.
Progress shows as a bar on a terminal and as a line every few seconds otherwise.
It exits non-zero when a check fails. Only 127.0.0.1 is ever contacted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from justscan_mcp.progress import Progress

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
TIMEOUT = 1.0  # JUSTSCAN_DELIVERY_TIMEOUT
ENV = {
    "JUSTSCAN_ALLOW_PRIVATE_TARGETS": "1",
    "JUSTSCAN_RETRY_SCHEDULE": "0.3,0.6,1.2",
    "JUSTSCAN_DELIVERY_TIMEOUT": str(TIMEOUT),
    # Longer than a PostgreSQL restart, so the restart alone never hands work to a second sender.
    "JUSTSCAN_LEASE_MARGIN": "8",
    "JUSTSCAN_POLL_INTERVAL": "0.5",
    "JUSTSCAN_MAX_IN_FLIGHT": "32",
    "JUSTSCAN_SLOW_LANE": "8",
}
MODES = ["2xx"] * 10 + ["4xx", "5xx", "5xx", "3xx", "slow", "never", "nul", "badutf8", "reset"]


# --- the receiver farm ------------------------------------------------------------------------


@dataclass
class Farm:
    """One asyncio HTTP/1.1 server for every endpoint: /mix/<n> answers as MODES says, at random
    per request; /void never answers. Records (delivery, attempt, arrival time) per request."""

    seed: int
    seen: list[tuple[int, int, float, str]] = field(default_factory=list)
    port: int = 0

    def start(self) -> None:
        ready = threading.Event()

        def run() -> None:
            asyncio.run(self._serve(ready))

        threading.Thread(target=run, daemon=True).start()
        ready.wait(10)

    async def _serve(self, ready: threading.Event) -> None:
        rng = random.Random(self.seed)
        holds: list[asyncio.StreamWriter] = []

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")
                    lines = head.decode("latin-1").split("\r\n")
                    path = lines[0].split(" ")[1]
                    headers = {
                        k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)
                    }
                    await reader.readexactly(int(headers.get("content-length", "0")))
                    delivery = int(headers.get("x-webhook-delivery", "0"))
                    attempt = int(headers.get("x-webhook-attempt", "0"))
                    self.seen.append((delivery, attempt, time.time(), path))
                    if path.startswith("/void"):
                        holds.append(writer)
                        return
                    mode = rng.choice(MODES)
                    if mode == "never":
                        holds.append(writer)
                        return
                    if mode == "reset":
                        sock = writer.get_extra_info("socket")
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        writer.close()
                        return
                    if mode == "slow":
                        await asyncio.sleep(TIMEOUT * 1.5)
                    status, body, extra = {
                        "2xx": (rng.choice([200, 201, 202, 204]), b"ok", ""),
                        "4xx": (rng.choice([400, 404, 410, 422]), b"no", ""),
                        "5xx": (rng.choice([500, 502, 503]), b"down", ""),
                        "3xx": (
                            rng.choice([301, 302, 307]),
                            b"",
                            "Location: https://127.0.0.1/elsewhere\r\n",
                        ),
                        "slow": (200, b"late", ""),
                        "nul": (200, b"ok\x00done", ""),
                        "badutf8": (200, b"\xff\xfe\xc3(", ""),
                    }[mode]
                    if status == 204:
                        body = b""
                    writer.write(
                        f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body
                    )
                    await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError, ValueError, IndexError):
                writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=1024)
        self.port = server.sockets[0].getsockname()[1]
        ready.set()
        async with server:
            await server.serve_forever()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


# --- processes --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_env(url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JUSTSCAN_")}
    return env | ENV | {"JUSTSCAN_DATABASE_URL": url}


def spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [PY, "-m", "justscan_mcp", *args], env=env, stdout=out, stderr=subprocess.STDOUT
        )


def wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception:
            pass
        time.sleep(0.05)
    raise SystemExit(f"soak: timed out waiting for {what}")


def restart_postgres(noticed: Any) -> None:
    """Stop PostgreSQL until a worker has noticed (`noticed()`: it logged the outage), then
    start it again. A bare `restart` took well under a poll interval here: no claim failed, so
    the outage path was not always exercised (one CI soak in four)."""
    version = sorted(os.listdir("/etc/postgresql"))[0]
    cluster = ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main"]
    subprocess.run([*cluster, "stop", "-m", "fast"], check=True, timeout=120)
    try:
        wait(noticed, 30, "a worker to notice the outage")
    finally:
        subprocess.run([*cluster, "start"], check=True, timeout=120)
    wait(lambda: subprocess.run(["pg_isready", "-h", "127.0.0.1", "-q"]).returncode == 0, 60, "PostgreSQL")


# --- the run ----------------------------------------------------------------------------------


@dataclass
class Hook:
    id: int
    team: int
    events: list[str]
    key: str
    # (start, end, active-after) of every switch, in wall-clock time: an event recorded between
    # start and end is not judged for this webhook.
    switches: list[tuple[float, float, bool]] = field(default_factory=list)
    active: bool = True
    deleted: bool = False
    void: bool = False


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=300, help="how long traffic and chaos last")
    parser.add_argument("--rate", type=float, default=12, help="events posted per second")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    base_url = os.environ.get("JUSTSCAN_TEST_DATABASE_URL", "").strip()
    if not base_url.startswith("postgresql"):
        raise SystemExit("soak: set JUSTSCAN_TEST_DATABASE_URL to a PostgreSQL URL")
    if not Path("/etc/postgresql").is_dir():
        raise SystemExit("soak: needs the local PostgreSQL cluster (it restarts it once)")

    sys.path.insert(0, str(ROOT / "src"))
    from justscan_mcp.store import normalise_url

    admin = create_engine(normalise_url(base_url), isolation_level="AUTOCOMMIT", pool_pre_ping=True)
    name = f"justscan_soak_{uuid.uuid4().hex[:8]}"
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(normalise_url(base_url)).set(database=name).render_as_string(hide_password=False)
    work = Path(tempfile.mkdtemp(prefix="justscan-soak-"))
    rng = random.Random(args.seed)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        env = child_env(url)
        subprocess.run([PY, "-m", "justscan_mcp", "db", "upgrade"], env=env, check=True, capture_output=True)
        farm = Farm(seed=args.seed)
        farm.start()

        # Teams, keys and webhooks, made with the operator CLI and the REST API.
        def cli(*a: str) -> Any:
            import json

            out = subprocess.run(
                [PY, "-m", "justscan_mcp", *a, "--json"], env=env, check=True, capture_output=True
            )
            return json.loads(out.stdout)

        ports = [free_port(), free_port()]
        for i, port in enumerate(ports):
            procs[f"server{i}"] = spawn(
                ["serve", "--transport", "http", "--port", str(port), "--no-dispatcher"],
                env,
                work / f"server{i}.log",
            )
        bases = [f"http://127.0.0.1:{p}" for p in ports]
        for b in bases:
            wait(lambda b=b: httpx.get(f"{b}/healthz", timeout=2).status_code == 200, 60, "servers")
        hooks: list[Hook] = []
        emit_keys: dict[int, str] = {}
        made: set[str] = set()  # every key and secret made: none may appear in a log
        for t in range(4):
            team = cli("team", "create", f"soak-{t}-{uuid.uuid4().hex[:6]}")["id"]
            key = cli(
                "key", "create", "--team", str(team), "--scopes", "webhooks:read,webhooks:write,events:write"
            )["key"]
            emit_keys[team] = key
            made.add(key)
            subscriptions = [["scan", "first_scan"], ["scan"], ["scan", "form_submit"], ["form_submit"]]
            for n, events in enumerate(subscriptions):
                r = httpx.post(
                    f"{bases[0]}/api/v1/webhooks",
                    json={"url": farm.url(f"/mix/{t}/{n}"), "events": events},
                    headers={"Authorization": f"Bearer {key}"},
                )
                r.raise_for_status()
                made.add(r.json()["secret"])
                hooks.append(Hook(r.json()["id"], team, events, key))
            if t == 0:
                r = httpx.post(
                    f"{bases[0]}/api/v1/webhooks",
                    json={"url": farm.url("/void"), "events": ["scan"]},
                    headers={"Authorization": f"Bearer {key}"},
                )
                r.raise_for_status()
                made.add(r.json()["secret"])
                hooks.append(Hook(r.json()["id"], team, ["scan"], key, void=True))
        for i in range(3):
            procs[f"worker{i}"] = spawn(["worker"], env, work / f"worker{i}.log")

        accepted: set[int] = set()
        refused = Counter[str]()
        stop = threading.Event()
        kill_times: list[float] = []

        def poster(which: int) -> None:
            client = httpx.Client(timeout=10)
            n = 0
            teams = list(emit_keys)
            while not stop.is_set():
                n += 1
                team = teams[n % len(teams)]
                if n % 3:
                    body = {"event": "scan", "data": {"qr_code_id": rng.randint(1, 40), "scan_id": n}}
                else:
                    body = {"event": "form_submit", "data": {"landing_page_id": 1, "fields": {"n": str(n)}}}
                try:
                    r = client.post(
                        f"{bases[which]}/api/v1/events",
                        json=body,
                        headers={"Authorization": f"Bearer {emit_keys[team]}"},
                    )
                    if r.status_code == 202:
                        accepted.add(r.json()["event_id"])
                    else:
                        refused[str(r.status_code)] += 1
                except httpx.HTTPError as exc:
                    refused[type(exc).__name__] += 1
                time.sleep(2 / args.rate)  # two posters together post `rate` per second

        posters = [threading.Thread(target=poster, args=(i,)) for i in range(2)]
        for p in posters:
            p.start()

        def change(h: Hook, method: str, path: str, **kw: Any) -> None:
            start = time.time()
            r = httpx.request(
                method,
                f"{rng.choice(bases)}/api/v1{path}",
                headers={"Authorization": f"Bearer {h.key}"},
                timeout=30,
                **kw,
            )
            if r.status_code >= 500:
                print(f"  chaos: {method} {path} answered {r.status_code}; trying again")
                time.sleep(1)
                r = httpx.request(
                    method,
                    f"{bases[0]}/api/v1{path}",
                    headers={"Authorization": f"Bearer {h.key}"},
                    timeout=30,
                    **kw,
                )
            r.raise_for_status()
            if "secret" in (answer := r.json() if r.content else {}):
                made.add(answer["secret"])
            if "active" in kw.get("json", {}):
                h.active = kw["json"]["active"]
                h.switches.append((start, time.time(), h.active))

        t0 = time.monotonic()
        mix = [h for h in hooks if not h.void]
        plan = [
            (0.10, "deactivate"),
            (0.20, "rotate"),
            (0.25, "sigkill worker0"),
            (0.30, "enable"),
            (0.40, "delete"),
            (0.45, "sigterm worker1"),
            (0.55, "deactivate"),
            (0.60, "postgres restart"),
            (0.70, "rotate"),
            (0.75, "enable"),
            (0.85, "delete"),
        ]
        shown = Progress("soak traffic and chaos", int(args.seconds), unit="s", stream=sys.stdout)

        def until(t: float) -> None:
            while (elapsed := time.monotonic() - t0) < t:
                shown.set(int(elapsed))
                time.sleep(0.05)

        for at, step in plan:
            until(at * args.seconds)
            live = [h for h in mix if not h.deleted]
            shown.write(f"  t={time.monotonic() - t0:5.1f}s  {step}")
            if step == "deactivate":
                for h in rng.sample([h for h in live if h.active], 2):
                    change(h, "PUT", f"/webhooks/{h.id}", json={"active": False})
            elif step == "enable":
                for h in [h for h in live if not h.active]:
                    change(h, "PUT", f"/webhooks/{h.id}", json={"active": True})
            elif step == "rotate":
                for h in rng.sample(live, 3):
                    change(h, "POST", f"/webhooks/{h.id}/rotate-secret", json={"grace_seconds": 60})
            elif step == "delete":
                h = rng.choice(live)
                change(h, "DELETE", f"/webhooks/{h.id}")
                h.deleted = True
            elif step == "sigkill worker0":
                kill_times.append(time.time())
                procs["worker0"].send_signal(signal.SIGKILL)
                procs["worker0"].wait()
                procs["worker0"] = spawn(["worker"], env, work / "worker0.log")
            elif step == "sigterm worker1":
                procs["worker1"].send_signal(signal.SIGTERM)
                procs["worker1"].wait(timeout=TIMEOUT + 15)
                procs["worker1"] = spawn(["worker"], env, work / "worker1.log")
            elif step == "postgres restart":
                restart_postgres(
                    lambda: any(
                        "database unavailable" in (work / f"worker{i}.log").read_text(errors="replace")
                        for i in range(3)
                    )
                )
        until(args.seconds)
        shown.set(int(args.seconds))
        shown.close()
        stop.set()
        for p in posters:
            p.join()
        traffic_end = time.monotonic()

        engine = create_engine(url)

        def open_count() -> int:
            with engine.connect() as c:
                return int(
                    c.execute(
                        text("SELECT count(*) FROM deliveries WHERE state IN ('pending', 'retrying')")
                    ).scalar_one()
                )

        backlog = open_count()
        drain_deadline = time.monotonic() + max(120.0, args.seconds)
        with Progress("draining open deliveries", backlog, stream=sys.stdout) as draining:
            while (left := open_count()) and time.monotonic() < drain_deadline:
                draining.set(max(0, backlog - left))
                time.sleep(0.5)
            draining.set(max(0, backlog - left))
        drained = time.monotonic() - traffic_end
        for key in ("worker0", "worker1", "worker2", "server0", "server1"):
            procs[key].send_signal(signal.SIGTERM)
        for p in procs.values():
            p.wait(timeout=60)
        return report(engine, hooks, accepted, refused, farm, kill_times, work, drained, made)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def report(
    engine: Any,
    hooks: list[Hook],
    accepted: set[int],
    refused: Counter[str],
    farm: Farm,
    kill_times: list[float],
    work: Path,
    drained: float,
    made: set[str],
) -> int:
    surviving = {h.id: h for h in hooks if not h.deleted}
    with engine.connect() as c:
        deliveries = c.execute(text("SELECT id, webhook_id, event_id, state FROM deliveries")).all()
        attempts = c.execute(
            text("SELECT delivery_id, number FROM delivery_attempts ORDER BY delivery_id, number")
        ).all()
        events = c.execute(text("SELECT id, team_id, name, EXTRACT(EPOCH FROM created_at) FROM events")).all()
    failures: list[str] = []

    states = Counter(state for _, _, _, state in deliveries)
    open_ = [d for d in deliveries if d[3] in ("pending", "retrying")]
    if open_:
        failures.append(f"{len(open_)} deliveries still open, e.g. {open_[:3]}")

    numbers: dict[int, list[int]] = defaultdict(list)
    for did, n in attempts:
        numbers[did].append(n)
    bad_numbers = [(d, ns) for d, ns in numbers.items() if ns != list(range(1, len(ns) + 1)) or len(ns) > 4]
    if bad_numbers:
        failures.append(f"attempt numbers with gaps, repeats or more than 4: {bad_numbers[:5]}")

    seen = Counter((d, a) for d, a, _, _ in farm.seen)
    first_at: dict[tuple[int, int], float] = {}
    for d, a, at, _ in farm.seen:
        first_at.setdefault((d, a), at)
    repeats = [pair for pair, n in seen.items() if n > 1]
    excused = [p for p in repeats if any(k - TIMEOUT - 1 <= first_at[p] <= k for k in kill_times)]
    unexcused = sorted(set(repeats) - set(excused))
    if unexcused:
        failures.append(f"(delivery, attempt) seen more than once outside the SIGKILL: {unexcused[:5]}")

    direct = {e[0] for e in events if e[2] in ("scan", "form_submit", "file_download")}
    if accepted != direct:
        failures.append(
            f"events accepted {len(accepted)} != stored {len(direct)}: "
            f"accepted but not stored {sorted(accepted - direct)[:5]}, stored not accepted {sorted(direct - accepted)[:5]}"
        )
    have: Counter[tuple[int, int]] = Counter((e, w) for _, w, e, _ in deliveries)
    dupes = [k for k, n in have.items() if n > 1]
    if dupes:
        failures.append(f"more than one delivery for one (event, webhook): {dupes[:5]}")
    missing, extra, judged = [], [], 0
    for eid, team, name, created in events:
        if name == "test":
            continue
        for h in surviving.values():
            if h.team != team:
                continue
            created_f = float(created)
            if any(s - 0.5 <= created_f <= e + 0.5 for s, e, _ in h.switches):
                continue  # recorded while this webhook was being switched: either answer is right
            active = True
            for _s, e, after in h.switches:
                if e < created_f:
                    active = after
            expected = active and name in h.events
            judged += 1
            if expected and (eid, h.id) not in have:
                missing.append((eid, h.id))
            if not expected and (eid, h.id) in have:
                extra.append((eid, h.id))
    if missing:
        failures.append(f"{len(missing)} deliveries missing for an active, subscribed webhook: {missing[:5]}")
    if extra:
        failures.append(f"{len(extra)} deliveries to an inactive or unsubscribed webhook: {extra[:5]}")

    tracebacks = []
    leaked = []
    said = Counter({"database unavailable": 0, "database reachable again": 0, "took over": 0})
    for log in sorted(work.glob("*.log")):
        content = log.read_text(errors="replace")
        if "Traceback" in content or "Exception in ASGI application" in content:
            tracebacks.append(log.name)
        leaked += [f"{log.name}: {secret[:8]}..." for secret in made if secret in content]
        for line in content.splitlines():
            for phrase in ("database unavailable", "database reachable again", "took over"):
                said[phrase] += phrase in line
    if tracebacks:
        failures.append(f"unhandled exceptions logged by: {tracebacks} (logs in {work})")
    if not made:
        failures.append("no key or secret was collected to look for in the logs")
    if leaked:
        failures.append(f"keys or secrets in the logs: {leaked}")
    if not said["database unavailable"] or not said["database reachable again"]:
        failures.append(f"the PostgreSQL restart was not logged as an outage and a recovery: {dict(said)}")
    if excused and not said["took over"]:
        failures.append("attempts of the SIGKILLed worker were sent again, but no takeover was logged")

    table = [
        ("events accepted (202)", len(accepted)),
        ("events refused or failed (by answer)", dict(refused)),
        ("events stored (direct / all)", f"{len(direct)} / {len(events)}"),
        ("deliveries", len(deliveries)),
        ("  succeeded", states["succeeded"]),
        ("  failed", states["failed"]),
        ("  open", len(open_)),
        ("attempts logged", len(attempts)),
        ("requests at the receiver farm", len(farm.seen)),
        ("  (delivery, attempt) repeats excused by the SIGKILL", len(excused)),
        ("  repeats not excused", len(unexcused)),
        ("(event, webhook) pairs judged for fan-out", judged),
        ("drain after traffic stopped", f"{drained:.1f} s"),
        ("keys and secrets looked for in the logs", len(made)),
        ("log lines: outage / recovery / takeover", " / ".join(str(said[p]) for p in said)),
        ("logs", str(work)),
    ]
    width = max(len(k) for k, _ in table)
    print("\n| measure | count |\n|---|---|")
    for k, v in table:
        print(f"| {k.ljust(width)} | {v} |")
    if failures:
        print("\nSOAK FAILED:")
        for f in failures:
            print(f"- {f}")
        return 1
    print("\nsoak: every check passed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
