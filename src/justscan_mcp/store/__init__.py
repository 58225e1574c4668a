"""The store: the one package that touches SQLAlchemy and the database driver.

`Store` is the assembly of small repositories over one `Database` connector (procrastinate's
split of a connector and its managers is the model):

- `db`: engine set-up, transactions, error translation, migrations;
- `outbox`: the delivery hot path (record, claim, complete), its SQL together;
- `access`: teams, API keys, dashboard sessions;
- `webhooks`: webhooks;
- `deliveries`: the delivery log's reads;
- `retention`: the sweep that deletes what is old enough;
- `oauth`: the authorization server's clients, consent requests, grants, codes and tokens;
- `audit`: the confirmations asked before destructive tool calls.

Each repository uses only `Database`, never another repository, so each can be read alone.
Driver errors are translated in `db` (`StoreUnavailable`, `Conflict`, `InvalidInput`), so nothing
above this package knows the driver. Methods are synchronous and short; async front ends call
the service through a worker thread so the event loop never waits on IO.
"""

from __future__ import annotations

from justscan_mcp.store.access import LAST_USED_RESOLUTION, AccessRepository
from justscan_mcp.store.audit import AuditRepository
from justscan_mcp.store.db import Database, create_db_engine, normalise_url, redact_url
from justscan_mcp.store.deliveries import DeliveryLog, OperationsCounts
from justscan_mcp.store.oauth import OAuthRepository
from justscan_mcp.store.outbox import (
    NOTIFY_CHANNEL,
    AttemptResult,
    Claimed,
    Claims,
    KeyRow,
    NewestDeliveryProbe,
    NewEvent,
    Outbox,
)
from justscan_mcp.store.retention import Purged, RetentionRepository
from justscan_mcp.store.webhooks import WebhookRepository


class Store(
    Outbox,
    AccessRepository,
    WebhookRepository,
    DeliveryLog,
    RetentionRepository,
    OAuthRepository,
    AuditRepository,
    Database,
):
    """Every repository over one database: what the service and the dispatcher are given."""


__all__ = [
    "LAST_USED_RESOLUTION",
    "NOTIFY_CHANNEL",
    "AccessRepository",
    "AttemptResult",
    "AuditRepository",
    "Claimed",
    "Claims",
    "Database",
    "DeliveryLog",
    "KeyRow",
    "NewEvent",
    "NewestDeliveryProbe",
    "OAuthRepository",
    "OperationsCounts",
    "Outbox",
    "Purged",
    "RetentionRepository",
    "Store",
    "WebhookRepository",
    "create_db_engine",
    "normalise_url",
    "redact_url",
]
