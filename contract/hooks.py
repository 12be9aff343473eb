"""Schemathesis hooks for Floodgate's contract run (contract/schemathesis.sh).

What they add to plain fuzzing of docs/openapi.yaml:

- credentials: a seller key, an ops key (from `devstack up`'s env file) and a pool of fan tokens
  (from the dev identity provider), given per operation by its `security` entry, so cases reach
  past 401;
- real ids: drops made here (a GA drop, a seated drop, a queue drop, each with room for many
  holds), and for hold and order operations a hold or order made for the case's fan just before
  it runs, so path parameters hit live objects most of the time;
- checks: every 4xx/5xx carries the error shape; every operation got at least one 2xx; after the
  run, `available + held + sold == total` for every bucket of every drop the seller owns.

The fan a hold or order was made for travels from `map_case` to the auth provider in the
`X-Contract-Fan` header, which the servers ignore.
"""

from __future__ import annotations

import json
import os
import random
import sys
import threading
import urllib.error
import urllib.request
import uuid

import schemathesis

BOOKING_URL = os.environ["BOOKING_URL"].rstrip("/")
QUEUE_URL = os.environ["QUEUE_URL"].rstrip("/")
SELLER_KEY = os.environ["FLOODGATE_SELLER_KEY"]
OPS_KEY = os.environ["FLOODGATE_OPS_KEY"]
FAN_HEADER = "X-Contract-Fan"
# How often a generated id is swapped for a live one; the rest stay as generated (404s).
LIVE_ID_SHARE = float(os.environ.get("CONTRACT_LIVE_ID_SHARE", "0.8"))
FANS = 24
# Fans whose holds and orders the hooks make for hold and order operations: apart from the ones
# fuzzed reserves use, so those can't fill these fans' per-fan limits.
HOLDERS = 12
# Hypothesis warns about the global `random` inside its strategies (hooks run inside them).
rng = random.Random()


def call(method: str, url: str, token: str | None = None, body=None, headers=None):
    """One HTTP request; (status, parsed JSON body or None)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, None


def must(expected: int, answer, what: str):
    status, body = answer
    if status != expected:
        raise RuntimeError(f"contract set-up: {what} answered {status}: {body}")
    return body


def create_drop(body: dict) -> str:
    drop = must(201, call("POST", f"{BOOKING_URL}/v1/drops", SELLER_KEY, body), "create drop")
    return drop["drop_id"]


GA_DROP_BODY = {
    "name": "contract GA",
    "per_fan_limit": 1000,
    "hold_ttl_s": 600,
    "admission": {"mode": "open"},
    "inventory": {
        "kind": "ga",
        "skus": [
            {"sku": "TEE-M", "name": "Tee, M", "price_cents": 2500, "quantity": 1000000},
            {"sku": "TEE-S", "name": "Tee, S", "price_cents": 2500, "quantity": 1000000},
        ],
    },
}
SEATED_DROP_BODY = {
    "name": "contract seated",
    "per_fan_limit": 1000,
    "hold_ttl_s": 600,
    "admission": {"mode": "open"},
    "inventory": {
        "kind": "seated",
        "sections": [
            {"section": "A", "price_cents": 9000, "rows": [{"row": str(r), "seats": 200} for r in range(1, 21)]},
        ],
    },
}
QUEUE_DROP_BODY = {
    "name": "contract queue",
    "per_fan_limit": 1000,
    "hold_ttl_s": 600,
    "admission": {"mode": "queue", "rate_per_s": 1000, "burst": 1000, "max_active": 100000},
    "inventory": {
        "kind": "ga",
        "skus": [{"sku": "HOODIE", "name": "Hoodie", "price_cents": 6000, "quantity": 1000000}],
    },
}


class World:
    """The drops and fans every case draws on, made once per schemathesis process."""

    def __init__(self) -> None:
        self.ga = create_drop(GA_DROP_BODY)
        self.seated = create_drop(SEATED_DROP_BODY)
        self.queue = create_drop(QUEUE_DROP_BODY)
        # Fan name → fan token, for every fan here.
        self.tokens: dict[str, str] = {}
        run = uuid.uuid4().hex[:8]
        self.fans = [f"contract-{run}-{i}" for i in range(FANS)]
        self.holders = [f"contract-{run}-holder-{i}" for i in range(HOLDERS)]
        for name in self.fans + self.holders:
            session = must(
                201, call("POST", f"{BOOKING_URL}/v1/fans/session", body={"fan": name}), "fan session"
            )
            self.tokens[name] = session["fan_token"]
        for name in self.fans:
            # Every fan has a place in the queue drop's line, so `/queue/me` answers 200.
            must_any(call("POST", f"{QUEUE_URL}/v1/drops/{self.queue}/queue", self.tokens[name]), "join")

    def fan(self) -> str:
        return rng.choice(self.fans)

    def holder(self) -> str:
        return rng.choice(self.holders)

    def hold(self, fan: str) -> str:
        """A fresh one-unit hold on the GA drop for `fan`."""
        body = must(
            201,
            call(
                "POST",
                f"{BOOKING_URL}/v1/drops/{self.ga}/holds",
                self.tokens[fan],
                {"items": [{"sku": "TEE-M", "quantity": 1}]},
                {"Idempotency-Key": uuid.uuid4().hex},
            ),
            "reserve",
        )
        return body["hold_id"]

    def order(self, fan: str) -> str:
        hold = self.hold(fan)
        body = must(
            201,
            call(
                "POST",
                f"{BOOKING_URL}/v1/holds/{hold}/confirm",
                self.tokens[fan],
                {"payment": {"gateway": "test", "reference": f"ok_{uuid.uuid4().hex}"}},
            ),
            "confirm",
        )
        return body["order_id"]


def must_any(answer, what: str) -> None:
    status, body = answer
    if status >= 300:
        raise RuntimeError(f"contract set-up: {what} answered {status}: {body}")


_world: World | None = None
_world_lock = threading.Lock()


def world() -> World:
    global _world
    with _world_lock:
        if _world is None:
            _world = World()
        return _world


def live(case) -> bool:
    """Whether this case gets live ids: always in the examples phase (the spec's examples are the
    cases sure to succeed, e.g. the only confirm with an `ok_` reference), else most of the time."""
    meta = getattr(case, "_meta", None)
    phase = getattr(getattr(meta, "phase", None), "name", None)
    return phase == "examples" or rng.random() < LIVE_ID_SHARE


# ---- cases ----------------------------------------------------------------------------------------


# Operations after which a drop sells nothing more: they get a drop of their own.
ENDS_A_DROP = ("/v1/drops/{drop_id}/close", "/v1/drops/{drop_id}/cancel")


@schemathesis.hook
def map_case(ctx, case):
    """Swaps generated ids for live ones most of the time, and names the fan they belong to."""
    w = world()
    op = case.operation
    path = op.path
    params = case.path_parameters if case.path_parameters is not None else {}
    fan = None

    if path in ENDS_A_DROP and params.get("drop_id") in (w.ga, w.seated, w.queue):
        # Schemathesis may reuse a drop id it saw in an answer (`GET /v1/drops` lists them), live
        # or not: closing (or cancelling) a shared drop would turn every later set-up reserve
        # into drop_closed.
        print(f"contract: {path} of shared drop {params['drop_id']} goes to a new drop", file=sys.stderr)
        params["drop_id"] = create_drop(GA_DROP_BODY)
    elif "drop_id" in params and path != "/drops/{drop_id}" and live(case):
        if path.startswith("/v1/drops/{drop_id}/queue"):
            params["drop_id"] = w.queue
        elif path in ENDS_A_DROP:
            # Closing or cancelling one of the shared drops would turn every later reserve into
            # drop_closed.
            params["drop_id"] = create_drop(GA_DROP_BODY)
        elif path == "/v1/drops/{drop_id}/seats":
            params["drop_id"] = w.seated
        elif path == "/v1/drops/{drop_id}/skus/{sku}/stock":
            # Only a GA drop's SKUs take stock; the shared GA drop's totals may grow (it is big).
            params["drop_id"] = w.ga
            params["sku"] = rng.choice(["TEE-M", "TEE-S"])
        elif path == "/v1/drops/{drop_id}/holds":
            body = case.body if isinstance(case.body, dict) else {}
            params["drop_id"] = w.ga if "items" in body else w.seated
        else:
            params["drop_id"] = rng.choice([w.ga, w.seated, w.queue])

    if "hold_id" in params and live(case):
        fan = w.holder()
        params["hold_id"] = w.hold(fan)

    if "order_id" in params and live(case):
        fan = w.holder()
        params["order_id"] = w.order(fan)
        # A refund is the seller's (or ops'), never the fan's: a fan token there is only a 401.
        if rng.random() < 0.3 or path.endswith("/refunds"):
            fan = "seller"

    if path.startswith("/v1/fans/me/") and isinstance(case.query, dict) and "drop_id" in case.query and live(case):
        case.query["drop_id"] = rng.choice([w.ga, w.seated])

    if fan is not None:
        # The auth provider may have run already (it sets the header too, from FAN_HEADER).
        case.headers = dict(case.headers or {})
        case.headers[FAN_HEADER] = fan
        case.headers["Authorization"] = f"Bearer {SELLER_KEY if fan == 'seller' else w.tokens[fan]}"
    return case


@schemathesis.auth(refresh_interval=None)
class FloodgateAuth:
    """The credential an operation's `security` asks for: seller key, ops key or a fan token."""

    def get(self, case, context):
        w = world()
        headers = case.headers or {}
        fan = headers.get(FAN_HEADER)
        if fan == "seller":
            return SELLER_KEY
        security = context.operation.definition.raw.get("security")
        if security is None or security == []:
            return None
        schemes = {name for requirement in security for name in requirement}
        if "sellerKey" in schemes and "fanToken" not in schemes:
            return SELLER_KEY
        if "opsKey" in schemes:
            return OPS_KEY
        return w.tokens.get(fan) or w.tokens[w.fan()]

    def set(self, case, data, context):
        if data is None:
            return
        case.headers = dict(case.headers or {})
        case.headers["Authorization"] = f"Bearer {data}"


# ---- checks ---------------------------------------------------------------------------------------


@schemathesis.check
def error_shape(ctx, response, case):
    """Every 4xx and 5xx is `{"error": {"code", "message", "detail"?}}`, with Retry-After on 429/503."""
    status = response.status_code
    if status < 400:
        return None
    try:
        body = json.loads(response.content)
    except ValueError:
        raise AssertionError(f"{status} without a JSON body: {response.content[:200]!r}")
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict) or not isinstance(err.get("code"), str) or not isinstance(err.get("message"), str):
        raise AssertionError(f"{status} without the error shape: {body}")
    extra = set(body) - {"error"} | set(err) - {"code", "message", "detail"}
    if extra:
        raise AssertionError(f"{status} error with unexpected fields {sorted(extra)}: {body}")
    if status in (429, 503) and not response.headers.get("retry-after"):
        raise AssertionError(f"{status} without Retry-After: {body}")
    return None


@schemathesis.check
class every_operation_2xx_and_stock_invariant:
    """After the run: every operation tested got a 2xx at least once, and every bucket of every
    drop the seller owns has `available + held + sold == total`."""

    def __init__(self):
        self.tested: set[str] = set()
        self.reached: set[str] = set()

    def after_response(self, ctx, response, case):
        label = case.operation.label
        self.tested.add(label)
        if 200 <= response.status_code < 300:
            self.reached.add(label)

    def after_run(self, ctx):
        never = self.tested - self.reached
        if never:
            raise AssertionError("never answered 2xx: " + ", ".join(sorted(never)))
        broken = stock_invariant_violations()
        if broken:
            raise AssertionError("stock invariant broken: " + "; ".join(broken))


def stock_invariant_violations() -> list[str]:
    listing = must(200, call("GET", f"{BOOKING_URL}/v1/drops", SELLER_KEY), "list drops")
    broken = []
    for summary in listing["drops"]:
        drop_id = summary["drop_id"]
        status, drop = call("GET", f"{BOOKING_URL}/v1/drops/{drop_id}")
        if status != 200:
            broken.append(f"GET /v1/drops/{drop_id} answered {status}: {drop}")
            continue
        for b in drop["inventory"]:
            if b["available"] + b["held"] + b["sold"] != b["total"]:
                broken.append(f"{drop_id} {b.get('sku') or b.get('section')}: {b}")
    return broken
