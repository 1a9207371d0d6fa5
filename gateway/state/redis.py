"""Redis-backed state store, shared by several gateways (or clusters of them).

Layout under ``key_prefix`` (default ``maestro``):

* ``{prefix}:engine:{engine_id}``   orjson record, with a PX TTL (the authority on liveness)
* ``{prefix}:engines``              sorted set of engine ids scored by expiry (epoch ms)
* ``{prefix}:gateway:{gateway_id}`` / ``{prefix}:gateways``  the same for heartbeats
* ``{prefix}:wf:{workflow_id}`` hash of a workflow's fields, ``{prefix}:wfr:{workflow_id}`` sorted set of its
  request ids in flight scored by their begin (ms, Redis ``TIME``, so that ids abandoned past ``inflight_s`` can
  be dropped); both carry the workflow TTL, refreshed by every step. ``{prefix}:wfx`` sorted set of workflow ids
  by their record's expiry (ms to the microsecond, Redis ``TIME``; with one TTL, the order of last activity): at
  most ``max_workflows`` records are kept, the least recently active dropped
  for a new one, one with a step in flight only where none of the next ``EVICT_LOOKAHEAD`` is free (a client
  sending a new workflow id with every request added a ~1 kB record per request for an hour, 110 MB in 5 minutes
  at 360 requests/s, until Redis refused writes). (Not ``wf:{id}:inflight``: a workflow id may hold a colon, and
  workflow ``x:inflight``'s hash would be workflow ``x``'s set.) Gateways before the sorted set kept a plain set
  under ``wfi:``: during a rolling upgrade each version keeps its own requests in flight, and both count steps
  into the one hash (a request begins and ends on one gateway).
* the shared KV ledger, per engine ``e`` and request ``r`` (all changed only by the Lua scripts below):
  ``{prefix}:kv:cap:{e}`` capacity in tokens (24 h TTL, re-set by every gateway's sync loop),
  ``{prefix}:kv:res:{e}`` hash r -> tokens, ``{prefix}:kv:exp:{e}`` sorted set r -> lease expiry (ms, Redis
  ``TIME``), ``{prefix}:kv:sum:{e}`` reserved total, ``{prefix}:kv:req:{r}`` -> e (PX lease),
  ``{prefix}:kv:epoch`` the ledger's generation (a random token; gone with the rest after a restart without
  persistence, which is how a gateway whose calls never failed learns its reservations were lost)

Why a sorted-set index: listing must not use KEYS/SCAN (O(keyspace), blocks a shared Redis). The key's own TTL
decides liveness; the index only has to be a superset, so listing reads ids scored a little in the past (to
tolerate clock skew between writers and readers), MGETs them, and drops ids whose key has already expired.

Why Lua for the ledger: check-and-reserve must be one atomic step or two gateways can both see room and both
take it. Each script runs atomically in Redis; expired leases are purged at the start of every operation on an
engine (so a dead gateway's reservations vanish within one lease), and expiry uses Redis' own clock (``TIME``),
so gateways with skewed clocks agree. Scripts are sent once and then called by SHA (EVALSHA; redis-py re-sends
a script the server forgot, e.g. after a restart). The scripts build key names from the prefix, which is fine
for a standalone or replicated Redis; a Redis Cluster would need the keys under one hash tag.
Why the per-engine keys also carry a TTL (twice the longest lease used on them, renewed by every write): an
engine nobody reserves on any more leaves nothing behind.

Why the hard timeouts and zero retries: callers keep serving from local state when Redis is slow or down, so
every call is bounded by ``timeout_s`` in total and failures surface at once as :class:`StateUnavailable`.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any, Callable
from urllib.parse import unquote_plus

import orjson
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from gateway.state.base import (EVICT_LOOKAHEAD, MAX_WORKFLOW_RECORDS, StateStore, StateUnavailable, check_inflight_s,
                                check_ttl)

# How far behind "now" listing still reads the index. Covers clock skew between gateways: an index entry is
# only pruned once it is this much past its expiry, and the key TTL filters anything already dead.
_SKEW_GRACE_MS = 30_000


def _check_ttl(ttl_s: float) -> int:
    """TTL in ms for PX, refused as the memory store refuses it."""
    check_ttl(ttl_s)
    return max(1, round(ttl_s * 1000))


_CAPACITY_TTL_MS = 24 * 3600 * 1000

_LEDGER_PRELUDE = """
local P = ARGV[1]
local t = redis.call('TIME')
local NOW = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function S(n) return string.format('%d', n) end
local function K(kind, id) return P .. ':kv:' .. kind .. ':' .. id end
local purged = {}
local function purge(e)
  if purged[e] then return end
  purged[e] = true
  local expk = K('exp', e)
  local dead = redis.call('ZRANGEBYSCORE', expk, '-inf', S(NOW))
  if #dead == 0 then return end
  local resk = K('res', e)
  local freed = 0
  for _, r in ipairs(dead) do
    local v = redis.call('HGET', resk, r)
    if v then
      freed = freed + tonumber(v)
      redis.call('HDEL', resk, r)
    end
    local rk = K('req', r)
    if redis.call('GET', rk) == e then redis.call('DEL', rk) end
  end
  redis.call('ZREMRANGEBYSCORE', expk, '-inf', S(NOW))
  if freed > 0 then redis.call('DECRBY', K('sum', e), S(freed)) end
end
local function touch(e, lease)
  local keep = lease * 2
  local expk = K('exp', e)
  if redis.call('PTTL', expk) < keep then
    redis.call('PEXPIRE', expk, S(keep))
    redis.call('PEXPIRE', K('res', e), S(keep))
    redis.call('PEXPIRE', K('sum', e), S(keep))
  end
end
"""

# ARGV: prefix, request id, engine, tokens, lease ms, force -> {ok, reserved after, capacity}
_LEDGER_RESERVE = _LEDGER_PRELUDE + """
local rid, e, tokens, lease = ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
purge(e)
local rk = K('req', rid)
local held = redis.call('GET', rk)
if held then purge(held) end
local cap = redis.call('GET', K('cap', e))
local sum = tonumber(redis.call('GET', K('sum', e)) or '0')
if redis.call('EXISTS', rk) == 1 then return {1, sum, tonumber(cap or '0')} end
if not cap then return {0, sum, 0} end
cap = tonumber(cap)
if ARGV[6] ~= '1' and sum + tokens > cap then return {0, sum, cap} end
redis.call('HSET', K('res', e), rid, S(tokens))
redis.call('ZADD', K('exp', e), S(NOW + lease), rid)
redis.call('INCRBY', K('sum', e), S(tokens))
redis.call('SET', rk, e, 'PX', S(lease))
touch(e, lease)
return {1, sum + tokens, cap}
"""

# ARGV: prefix, request id, tokens, lease ms, force -> 1 | 0
_LEDGER_GROW = _LEDGER_PRELUDE + """
local rid, tokens, lease = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local rk = K('req', rid)
local e = redis.call('GET', rk)
if not e then return 0 end
purge(e)
local resk = K('res', e)
local held = redis.call('HGET', resk, rid)
if not held then return 0 end
local extra = tokens - tonumber(held)
if extra > 0 then
  local cap = tonumber(redis.call('GET', K('cap', e)) or '0')
  local sum = tonumber(redis.call('GET', K('sum', e)) or '0')
  if ARGV[5] ~= '1' and sum + extra > cap then return 0 end
  redis.call('HSET', resk, rid, S(tokens))
  redis.call('INCRBY', K('sum', e), S(extra))
end
redis.call('ZADD', K('exp', e), S(NOW + lease), rid)
redis.call('PEXPIRE', rk, S(lease))
touch(e, lease)
return 1
"""

# ARGV: prefix, request id -> tokens freed
_LEDGER_RELEASE = _LEDGER_PRELUDE + """
local rid = ARGV[2]
local rk = K('req', rid)
local e = redis.call('GET', rk)
if not e then return 0 end
purge(e)
redis.call('DEL', rk)
local resk = K('res', e)
local held = redis.call('HGET', resk, rid)
if not held then return 0 end
redis.call('HDEL', resk, rid)
redis.call('ZREM', K('exp', e), rid)
redis.call('DECRBY', K('sum', e), held)
return tonumber(held)
"""

# ARGV: prefix, lease ms, request ids... -> how many were still held
_LEDGER_REFRESH = _LEDGER_PRELUDE + """
local lease = tonumber(ARGV[2])
local lapsed = {}
for i = 3, #ARGV do
  local rid = ARGV[i]
  local rk = K('req', rid)
  local e = redis.call('GET', rk)
  local held = false
  if e then
    purge(e)
    local expk = K('exp', e)
    if redis.call('ZSCORE', expk, rid) then
      redis.call('ZADD', expk, S(NOW + lease), rid)
      redis.call('PEXPIRE', rk, S(lease))
      touch(e, lease)
      held = true
    end
  end
  if not held then
    lapsed[#lapsed + 1] = rid
  end
end
return lapsed
"""

# ARGV: prefix, engines... -> {reserved, capacity, reserved, capacity, ...}
_LEDGER_USAGE = _LEDGER_PRELUDE + """
local out = {}
for i = 2, #ARGV do
  local e = ARGV[i]
  purge(e)
  out[#out + 1] = tonumber(redis.call('GET', K('sum', e)) or '0')
  out[#out + 1] = tonumber(redis.call('GET', K('cap', e)) or '0')
end
out[#out + 1] = redis.call('GET', P .. ':kv:epoch') or ''
return out
"""

# ARGV: prefix, a new token -> the ledger's epoch (the token, if it had none)
_LEDGER_EPOCH = """
local k = ARGV[1] .. ':kv:epoch'
local v = redis.call('GET', k)
if not v then
  redis.call('SET', k, ARGV[2])
  v = ARGV[2]
end
return v
"""

# The store's clock in ms (TIME), and the ids in flight since before ARGV[n] ms ago dropped ('' = none dropped).
# string.format: a Lua number as a string is written with 14 significant digits ("%.14g"), and epoch ms has 13.
# ``keep_index``: a record's entry in the index, scored by when the record expires (to the microsecond, so that
# two records touched in one millisecond keep their order: Redis orders equal scores by name), and the index's
# own TTL made at least the record's (never shortened: the last write may carry a shorter TTL than others).
_WORKFLOW_CLOCK = """
local t = redis.call('TIME')
local clock = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local clock_us = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local function keep_index(idx, id, ttl)
  redis.call('ZADD', idx, string.format('%.3f', clock_us + tonumber(ttl)), id)
  if redis.call('PTTL', idx) < tonumber(ttl) then redis.call('PEXPIRE', idx, ttl) end
end
local function raise_last_activity(wf, now)  -- never back (a late replay); set where it is missing, whatever now
  local last = redis.call('HGET', wf, 'last_activity')
  if not last or tonumber(now) > tonumber(last) then redis.call('HSET', wf, 'last_activity', now) end
end
local function drop_abandoned(wfr, inflight_ms)
  if inflight_ms ~= '' then
    return redis.call('ZREMRANGEBYSCORE', wfr, '-inf', string.format('(%.0f', clock - tonumber(inflight_ms)))
  end
  return 0
end
"""

# KEYS: record hash, in-flight sorted set, index. ARGV: workflow id, request id, now, ttl ms, step, deadline,
# slo class, expected steps, predicted remaining s, in flight at most ms ('' = not given), key prefix, records kept
# at most -> {hash fields, in-flight ids}
_WORKFLOW_BEGIN = _WORKFLOW_CLOCK + f"local EVICT_LOOKAHEAD = {EVICT_LOOKAHEAD}" + """
local wf, wfr, idx = KEYS[1], KEYS[2], KEYS[3]
local now, ttl = ARGV[3], ARGV[4]
redis.call('ZREMRANGEBYSCORE', idx, '-inf', string.format('(%.3f', clock_us))  -- expired by now
if redis.call('EXISTS', wf) == 0 then
  redis.call('ZREM', idx, ARGV[1])  -- its own record's entry, if that record has just expired
  -- the least recently active give way for this one: of the first EVICT_LOOKAHEAD (and one more for each record
  -- over but the first), those with no step in flight first; at most EVICT_LOOKAHEAD a begin (a lowered
  -- max_workflows is reached over several begins, not in one long script)
  local over = math.min(redis.call('ZCARD', idx) + 1 - tonumber(ARGV[12]), EVICT_LOOKAHEAD)
  if over > 0 then
    local candidates = redis.call('ZRANGE', idx, 0, over + EVICT_LOOKAHEAD - 2)
    for pass = 1, 2 do
      for _, id in ipairs(candidates) do
        if over > 0 and (pass == 2 or redis.call('ZCARD', ARGV[11] .. ':wfr:' .. id) == 0)
            and redis.call('ZREM', idx, id) == 1 then
          redis.call('DEL', ARGV[11] .. ':wf:' .. id, ARGV[11] .. ':wfr:' .. id)
          over = over - 1
        end
      end
    end
  end
  redis.call('HSET', wf, 'workflow_id', ARGV[1], 'arrival', now, 'steps_done', '0', 'tokens_used', '0')
elseif tonumber(now) < tonumber(redis.call('HGET', wf, 'arrival') or now) then
  redis.call('HSET', wf, 'arrival', now)  -- an earlier step's begin that arrived late (replayed after an outage)
end
if ARGV[5] ~= '' then
  local last = redis.call('HGET', wf, 'last_step')
  if not last or tonumber(ARGV[5]) > tonumber(last) then redis.call('HSET', wf, 'last_step', ARGV[5]) end
end
local names = {'deadline', 'slo_class', 'expected_steps', 'predicted_remaining_s'}
for i, name in ipairs(names) do
  if ARGV[5 + i] ~= '' then redis.call('HSET', wf, name, ARGV[5 + i]) end
end
raise_last_activity(wf, now)
keep_index(idx, ARGV[1], ttl)
drop_abandoned(wfr, ARGV[10])
redis.call('ZADD', wfr, 'NX', string.format('%.0f', clock), ARGV[2])  -- NX: a repeated begin keeps the first
redis.call('PEXPIRE', wf, ttl)
redis.call('PEXPIRE', wfr, ttl)
return {redis.call('HGETALL', wf), redis.call('ZRANGE', wfr, 0, -1)}
"""

# KEYS: record hash, in-flight sorted set, index. ARGV: request id, now, ttl ms, tokens, completed ('1'/'0'), in
# flight at most ms ('' = not given), workflow id
_WORKFLOW_END = _WORKFLOW_CLOCK + """
local wf, wfr, idx = KEYS[1], KEYS[2], KEYS[3]
if redis.call('EXISTS', wf) == 0 then return false end
drop_abandoned(wfr, ARGV[6])
if redis.call('ZREM', wfr, ARGV[1]) == 1 then
  keep_index(idx, ARGV[7], ARGV[3])  -- activity: its record lives on, and is the last to give way
  redis.call('HINCRBY', wf, 'tokens_used', ARGV[4])
  if ARGV[5] == '1' then redis.call('HINCRBY', wf, 'steps_done', 1) end
  raise_last_activity(wf, ARGV[2])
  redis.call('PEXPIRE', wf, ARGV[3])
  redis.call('PEXPIRE', wfr, ARGV[3])
end
return {redis.call('HGETALL', wf), redis.call('ZRANGE', wfr, 0, -1)}
"""

_WF_FLOATS = ("arrival", "deadline", "predicted_remaining_s", "last_activity")
_WF_INTS = ("steps_done", "tokens_used", "expected_steps", "last_step")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _workflow_record(reply: Any) -> dict[str, Any] | None:
    """The reply {HGETALL, in-flight ids} as the same dict the memory store returns."""
    if not reply:
        return None
    flat, members = reply
    fields = {_text(flat[i]): _text(flat[i + 1]) for i in range(0, len(flat), 2)}
    record: dict[str, Any] = {"workflow_id": fields.get("workflow_id", ""), "slo_class": fields.get("slo_class")}
    for name in _WF_FLOATS:
        record[name] = float(fields[name]) if name in fields else None
    for name in _WF_INTS:
        record[name] = int(fields[name]) if name in fields else None
    record["inflight"] = sorted(_text(m) for m in members)
    return {key: record[key] for key in ("workflow_id", "arrival", "deadline", "slo_class", "steps_done",
                                         "tokens_used", "expected_steps", "last_step", "predicted_remaining_s",
                                         "inflight", "last_activity")}


def _arg(value: Any) -> str:
    """A Lua argument: '' for None, repr for floats (exact round trip), str otherwise."""
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _inflight_ms(inflight_s: float | None) -> str:
    """``inflight_s`` as a Lua argument in ms ('' for None), refused as the memory store refuses it."""
    check_inflight_s(inflight_s)
    return "" if inflight_s is None else str(max(1, round(inflight_s * 1000)))


def redact_url(url: str) -> str:
    """The Redis URL for logs and error messages, without any password: redis-py takes one in the user part
    (``redis://:secret@host``) or as a query option (``redis://host/0?password=secret``, which it unquotes as
    it parses). The user part is found by hand, as everything up to the URL's last "@": a password with a "/",
    "?" or "#" it does not percent-encode ends a URL parser's host part early, and was shown whole (a "@" in a
    query only masks more). The rest is left as written."""
    scheme, separator, rest = url.partition("://")
    userinfo, at, after = rest.rpartition("@")
    if separator and at and ":" in userinfo:
        url = f"{scheme}://{userinfo.partition(':')[0]}:***@{after}"
    head, mark, query = url.partition("?")
    options = query.split("&")
    for index, option in enumerate(options):
        name, equals, _ = option.partition("=")
        if equals and unquote_plus(name).lower() == "password":
            options[index] = f"{name}=***"
    return head + mark + "&".join(options)


# Connections a gateway holds to Redis at most; more concurrent calls wait for one. A call takes well under a
# millisecond, so a few dozen serve thousands of requests a second; the bound keeps a burst (re-adopting every
# reservation after an outage) from opening thousands.
DEFAULT_MAX_CONNECTIONS = 64


class RedisStateStore(StateStore):
    """StateStore on Redis via redis-py asyncio. Constructing does no I/O; the client connects on first use."""

    def __init__(self, url: str, key_prefix: str = "maestro", timeout_s: float = 1.0,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS, max_workflows: int = MAX_WORKFLOW_RECORDS) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        if max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {max_connections!r}")
        if max_workflows < 1:
            raise ValueError(f"max_workflows must be >= 1, got {max_workflows!r}")
        self.max_workflows = max_workflows
        self._url = url
        self._max_connections = max_connections
        self._prefix = key_prefix
        self._timeout_s = timeout_s
        self._client: aioredis.Redis | None = None
        self._engines_idx = f"{key_prefix}:engines"
        self._gateways_idx = f"{key_prefix}:gateways"
        self._workflows_idx = f"{key_prefix}:wfx"
        self._scripts: dict[str, Any] = {}

    # ------------------------------------------------------------------ plumbing

    def _redis(self) -> aioredis.Redis:
        """Create the client lazily, so building the store (e.g. at config load) never touches the network."""
        if self._client is None:
            # A pool whose calls wait for a free connection (each call's wait is inside its timeout): redis-py's
            # default pool refuses the 101st concurrent call at once (MaxConnectionsError, a ConnectionError), and
            # a gateway under load read a healthy Redis as down, fell back to half its engines' KV, re-adopted on
            # return, and tipped over again, about once a second.
            pool = aioredis.BlockingConnectionPool.from_url(
                self._url,
                max_connections=self._max_connections,
                timeout=self._timeout_s,
                socket_timeout=self._timeout_s,
                socket_connect_timeout=self._timeout_s,
                # redis-py retries 10 times by default, which would multiply the bound; fail fast instead.
                retry=Retry(NoBackoff(), 0),
            )
            self._client = aioredis.Redis.from_pool(pool)  # closing the client closes its pool
        return self._client

    def _script(self, source: str) -> Any:
        """A registered script for the current client (EVALSHA, re-sent automatically after NOSCRIPT)."""
        client = self._redis()
        script = self._scripts.get(source)
        if script is None or script.registered_client is not client:
            script = self._scripts[source] = client.register_script(source)
        return script

    async def _run(self, op: str, source: str, keys: list[str], args: list[Any]) -> Any:
        try:
            async with asyncio.timeout(self._timeout_s):
                return await self._script(source)(keys=keys, args=args)
        except (RedisError, OSError) as exc:
            raise self._unavailable(op, exc) from exc

    def _unavailable(self, op: str, exc: BaseException) -> StateUnavailable:
        detail = "timed out" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
        return StateUnavailable(
            f"Redis state store at {redact_url(self._url)} unavailable during {op} "
            f"(timeout {self._timeout_s:g}s): {detail}"
        )

    def _engine_key(self, engine_id: str) -> str:
        return f"{self._prefix}:engine:{engine_id}"

    def _gateway_key(self, gateway_id: str) -> str:
        return f"{self._prefix}:gateway:{gateway_id}"

    async def _put(self, op: str, key: str, index: str, member: str, record: dict[str, Any], ttl_s: float) -> None:
        """SET key PX ttl + ZADD index, in one MULTI so the index never misses a live key."""
        ttl_ms = _check_ttl(ttl_s)
        blob = orjson.dumps(record)  # TypeError for non-JSON values, before any I/O
        now_ms = int(time.time() * 1000)
        try:
            async with asyncio.timeout(self._timeout_s):
                async with self._redis().pipeline(transaction=True) as pipe:
                    pipe.set(key, blob, px=ttl_ms)
                    pipe.zadd(index, {member: now_ms + ttl_ms})
                    # long-dead entries go here too, as a listing prunes them: a store whose gateways are never
                    # listed (admission off) kept every gateway that ever died uncleanly
                    pipe.zremrangebyscore(index, "-inf", f"({now_ms - _SKEW_GRACE_MS}")
                    await pipe.execute()
        except (RedisError, OSError) as exc:  # builtin TimeoutError is an OSError
            raise self._unavailable(op, exc) from exc

    async def _list(self, op: str, index: str, key_of: Callable[[str], str]) -> dict[str, dict[str, Any]]:
        """Prune long-dead index entries, read the rest, keep those whose key still exists."""
        floor_ms = int(time.time() * 1000) - _SKEW_GRACE_MS
        try:
            async with asyncio.timeout(self._timeout_s):
                client = self._redis()
                async with client.pipeline(transaction=False) as pipe:
                    pipe.zremrangebyscore(index, "-inf", f"({floor_ms}")
                    pipe.zrangebyscore(index, floor_ms, "+inf")
                    _, raw_ids = await pipe.execute()
                if not raw_ids:
                    return {}
                ids = [m.decode() if isinstance(m, bytes) else m for m in raw_ids]
                blobs = await client.mget([key_of(i) for i in ids])
        except (RedisError, OSError) as exc:
            raise self._unavailable(op, exc) from exc
        return {i: orjson.loads(b) for i, b in zip(ids, blobs) if b is not None}

    # ------------------------------------------------------------------ StateStore

    async def put_engine(self, engine_id: str, record: dict[str, Any], ttl_s: float) -> None:
        await self._put("put_engine", self._engine_key(engine_id), self._engines_idx, engine_id, record, ttl_s)

    async def get_engine(self, engine_id: str) -> dict[str, Any] | None:
        try:
            async with asyncio.timeout(self._timeout_s):
                blob = await self._redis().get(self._engine_key(engine_id))
        except (RedisError, OSError) as exc:
            raise self._unavailable("get_engine", exc) from exc
        return None if blob is None else orjson.loads(blob)

    async def get_engines(self) -> dict[str, dict[str, Any]]:
        return await self._list("get_engines", self._engines_idx, self._engine_key)

    async def delete_engine(self, engine_id: str) -> None:
        await self._delete("delete_engine", self._engine_key(engine_id), self._engines_idx, engine_id)

    async def _delete(self, op: str, key: str, index: str, member: str) -> None:
        try:
            async with asyncio.timeout(self._timeout_s):
                async with self._redis().pipeline(transaction=True) as pipe:
                    pipe.delete(key)
                    pipe.zrem(index, member)
                    await pipe.execute()
        except (RedisError, OSError) as exc:
            raise self._unavailable(op, exc) from exc

    async def heartbeat(self, gateway_id: str, info: dict[str, Any], ttl_s: float) -> None:
        await self._put("heartbeat", self._gateway_key(gateway_id), self._gateways_idx, gateway_id, info, ttl_s)

    async def gateways(self) -> dict[str, dict[str, Any]]:
        return await self._list("gateways", self._gateways_idx, self._gateway_key)

    async def remove_gateway(self, gateway_id: str) -> None:
        await self._delete("remove_gateway", self._gateway_key(gateway_id), self._gateways_idx, gateway_id)

    # ------------------------------------------------------------------ workflows

    def _workflow_keys(self, workflow_id: str) -> list[str]:
        return [f"{self._prefix}:wf:{workflow_id}", f"{self._prefix}:wfr:{workflow_id}", self._workflows_idx]

    async def workflow_begin(self, workflow_id: str, request_id: str, *, now: float, ttl_s: float,
                             step: int | None = None, deadline: float | None = None, slo_class: str | None = None,
                             expected_steps: int | None = None, predicted_remaining_s: float | None = None,
                             inflight_s: float | None = None) -> dict[str, Any]:
        ttl_ms = _check_ttl(ttl_s)
        args = [workflow_id, request_id, _arg(float(now)), ttl_ms, _arg(None if step is None else int(step)),
                _arg(None if deadline is None else float(deadline)), _arg(slo_class),
                _arg(None if expected_steps is None else int(expected_steps)),
                _arg(None if predicted_remaining_s is None else float(predicted_remaining_s)),
                _inflight_ms(inflight_s), self._prefix, self.max_workflows]
        reply = await self._run("workflow_begin", _WORKFLOW_BEGIN, self._workflow_keys(workflow_id), args)
        return _workflow_record(reply)  # type: ignore[return-value]

    async def workflow_end(self, workflow_id: str, request_id: str, *, now: float, ttl_s: float, tokens: int = 0,
                           completed: bool = True, inflight_s: float | None = None) -> dict[str, Any] | None:
        ttl_ms = _check_ttl(ttl_s)
        args = [request_id, _arg(float(now)), ttl_ms, int(tokens), "1" if completed else "0",
                _inflight_ms(inflight_s), workflow_id]
        reply = await self._run("workflow_end", _WORKFLOW_END, self._workflow_keys(workflow_id), args)
        return _workflow_record(reply)

    async def get_workflow(self, workflow_id: str, inflight_s: float | None = None) -> dict[str, Any] | None:
        inflight_ms = _inflight_ms(inflight_s)
        keys = self._workflow_keys(workflow_id)
        try:
            async with asyncio.timeout(self._timeout_s):
                async with self._redis().pipeline(transaction=True) as pipe:
                    pipe.time()
                    pipe.hgetall(keys[0])
                    pipe.zrange(keys[1], 0, -1, withscores=True)
                    (seconds, micros), fields, members = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise self._unavailable("get_workflow", exc) from exc
        if not fields:
            return None
        if inflight_ms:  # read only: the ids abandoned are left out here, dropped by the next begin or end
            cutoff = int(seconds) * 1000 + int(micros) // 1000 - int(inflight_ms)
            members = [(member, score) for member, score in members if score >= cutoff]
        flat = [item for pair in fields.items() for item in pair]
        return _workflow_record([flat, [member for member, _ in members]])

    # ------------------------------------------------------------------ shared KV ledger

    async def ledger_set_capacity(self, engine_id: str, tokens: int) -> None:
        if tokens < 0:
            raise ValueError("capacity must be >= 0")
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._redis().set(f"{self._prefix}:kv:cap:{engine_id}", int(tokens), px=_CAPACITY_TTL_MS)
        except (RedisError, OSError) as exc:
            raise self._unavailable("ledger_set_capacity", exc) from exc

    async def ledger_reserve(self, request_id: str, engine_id: str, tokens: int, lease_s: float,
                             force: bool = False) -> bool:
        return (await self.ledger_reserve_detail(request_id, engine_id, tokens, lease_s, force))[0]

    async def ledger_reserve_detail(self, request_id: str, engine_id: str, tokens: int, lease_s: float,
                                    force: bool = False) -> tuple[bool, int, int]:
        """:meth:`ledger_reserve` plus the engine's reserved total and capacity after it (one round trip), so
        the caller's view of the engine stays fresh even when the reservation lost a race."""
        if tokens < 0:
            raise ValueError("tokens must be >= 0")
        lease_ms = _check_ttl(lease_s)
        ok, reserved, capacity = await self._run(
            "ledger_reserve", _LEDGER_RESERVE, [],
            [self._prefix, request_id, engine_id, int(tokens), lease_ms, "1" if force else "0"])
        return bool(ok), int(reserved), int(capacity)

    async def ledger_grow(self, request_id: str, tokens: int, lease_s: float, force: bool = False) -> bool:
        lease_ms = _check_ttl(lease_s)
        reply = await self._run("ledger_grow", _LEDGER_GROW, [],
                                [self._prefix, request_id, int(tokens), lease_ms, "1" if force else "0"])
        return bool(reply)

    async def ledger_release(self, request_id: str) -> int:
        return int(await self._run("ledger_release", _LEDGER_RELEASE, [], [self._prefix, request_id]))

    async def ledger_refresh(self, request_ids: list[str], lease_s: float) -> int:
        return len(request_ids) - len(await self.ledger_refresh_lapsed(request_ids, lease_s))

    async def ledger_refresh_lapsed(self, request_ids: list[str], lease_s: float) -> list[str]:
        lease_ms = _check_ttl(lease_s)
        if not request_ids:
            return []
        lapsed = await self._run("ledger_refresh", _LEDGER_REFRESH, [], [self._prefix, lease_ms, *request_ids])
        return [_text(rid) for rid in lapsed]

    async def ledger_usage(self, engine_ids: list[str]) -> dict[str, tuple[int, int]]:
        if not engine_ids:
            return {}
        return (await self.ledger_usage_epoch(engine_ids))[0]

    async def ledger_usage_epoch(self, engine_ids: list[str]) -> tuple[dict[str, tuple[int, int]], str]:
        """:meth:`ledger_usage` and the ledger's epoch ("" when it has none) in one round trip."""
        flat = await self._run("ledger_usage", _LEDGER_USAGE, [], [self._prefix, *engine_ids])
        return {e: (int(flat[2 * i]), int(flat[2 * i + 1])) for i, e in enumerate(engine_ids)}, _text(flat[-1])

    async def ledger_epoch(self) -> str:
        """The shared ledger's generation: a random token, set by the first gateway that asks and gone with the
        ledger (a Redis that restarted empty). A gateway that finds it changed knows the store lost its running
        reservations although no call of its own failed, and takes them back (see SharedLedger)."""
        return _text(await self._run("ledger_epoch", _LEDGER_EPOCH, [], [self._prefix, uuid.uuid4().hex]))

    # ------------------------------------------------------------------ lifecycle

    async def ping(self) -> bool:
        """Health probe: never raises, False on any failure within ``timeout_s``."""
        try:
            async with asyncio.timeout(self._timeout_s):
                return bool(await self._redis().ping())
        except (RedisError, OSError):
            return False

    async def close(self) -> None:
        """Drop the client and its pool. Idempotent; a later call reconnects lazily. Bounded by ``timeout_s``
        like every other call: closing connections to a server that died or restarted must not hang shutdown."""
        client, self._client = self._client, None
        self._scripts.clear()
        if client is None:
            return
        closer = getattr(client, "aclose", None) or client.close
        try:
            async with asyncio.timeout(self._timeout_s):
                await closer()
        except (RedisError, OSError):  # builtin TimeoutError is an OSError
            pass  # closing a connection to a dead server is not an error worth surfacing
