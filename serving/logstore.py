"""The prediction log's store: the one owner of its table, on SQLite or PostgreSQL, chosen by URL.

    sqlite:///abs/path.sqlite      SQLite (embedded, the default): one proxy, or several on one host
    sqlite:relative/path.sqlite    the same, relative to the working directory
    build/prediction_log.sqlite    a bare path is SQLite too
    postgresql://user:password@host:port/database   (postgres:// too) many proxy replicas, one log

One row per client request; a shadow copy's answer is a second row:

    request_id         the proxy's own id (uuid hex); a shadow answer is "<request_id>:shadow". Unique.
    client_request_id  the X-Request-Id the client sent (NULL if none). Not unique: clients reuse ids.
    ts                 unix seconds when the proxy received the request
    model              model name in the URL
    variant            who answered: an A/B variant name, or "fallback"
    model_version      the version that answered (NULL when unknown or fallback)
    shadow             1 for a shadow copy's answer (never returned to the client), else 0
    api                predict | classify | regress
    status             HTTP status returned
    latency_ms         proxy receipt to response, milliseconds
    routing_key        the sticky key the split used (NULL if none)
    request            the body as received (JSON, unless the client sent something else)
    response           the body returned (outputs, or {"error": ...})
    policy             who decided the answer: "model" (the split's variant), or "holdback:<policy>" for
                       the held-back users (serving/proxy.py's PROXY_HOLDBACK_*); NULL in older logs
    propensity         the probability of the row's policy (1 - share for "model", the share for a
                       held-back row, share / K for a random draw), not of the answer given: the
                       proxy never asks the model about held-back users (serving/proxy.py)

Every failure of the store (sqlite3.Error, psycopg.Error, OSError) is raised as StoreError, whose
message names the store's URL with any password masked. psycopg is imported only for a
PostgreSQL URL, so an SQLite-only image does not need it.
"""

import contextlib
import json
import os
import re
import sqlite3
import urllib.parse
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from serving import wire

COLUMNS = ("request_id", "client_request_id", "ts", "model", "variant", "model_version", "shadow", "api",
           "status", "latency_ms", "routing_key", "request", "response", "policy", "propensity")
TABLE = "predictions"
# A record's policy when the proxy's holdback answered: this prefix and the baseline policy's name.
HOLDBACK_POLICY_PREFIX = "holdback:"
NULLABLE = ("client_request_id", "model_version", "routing_key", "policy", "propensity")  # every other column is NOT NULL in both DDLs
ACCEPTED_FORMS = ("sqlite:///absolute/path.sqlite, sqlite:relative/path.sqlite, a bare file path (SQLite), "
                  "or postgresql://user:password@host:port/database (postgres:// also)")
SQLITE_TIMEOUT_SECONDS = 10  # how long a writer waits for another's lock; also PostgreSQL's connect timeout
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_MASK = "***"
_SHADOW = COLUMNS.index("shadow")


def refusal(row: Sequence[Any]) -> Optional[str]:
    """Why the table would refuse a row (in COLUMNS order), or None: a writer drops such a row,
    counted, instead of letting it fail every batch it is in."""
    if len(row) != len(COLUMNS):
        return f"a record has {len(row)} fields, the table {len(COLUMNS)}"
    missing = [c for c, v in zip(COLUMNS, row) if v is None and c not in NULLABLE]
    return f"a record without {', '.join(missing)}" if missing else None


class StoreError(Exception):
    """The store failed (cannot open, read or write); the message names the URL, password masked."""


# --- URLs ---------------------------------------------------------------------------------

def _parse(url: str) -> Tuple[str, str]:
    """("sqlite", filesystem path) or ("postgresql", the URL); ValueError for anything else."""
    if not isinstance(url, str) or not url.strip():
        raise ValueError(f"prediction log URL {url!r}: empty; give {ACCEPTED_FORMS}")
    match = _SCHEME.match(url)
    if match is None:
        return "sqlite", url
    scheme, rest = match.group(1).lower(), url[match.end():]
    if scheme in ("postgresql", "postgres"):
        return "postgresql", url
    if scheme == "sqlite" and rest.startswith("//"):  # sqlite://<host>/<path>: the host must be empty
        if rest.startswith("///"):  # sqlite:///abs, and SQLAlchemy's sqlite:////abs, are both /abs
            return "sqlite", "/" + rest.lstrip("/")
        raise ValueError(f"prediction log URL {_hide_password(url)}: an SQLite URL has no host; give {ACCEPTED_FORMS}")
    if scheme == "sqlite" and rest:
        return "sqlite", rest
    raise ValueError(f"prediction log URL {_hide_password(url)}: not a prediction log location; give {ACCEPTED_FORMS}")


def _password(url: str) -> Optional[str]:
    parts = urllib.parse.urlsplit(url)
    userinfo, at, _ = parts.netloc.rpartition("@")
    if at and ":" in userinfo:
        return userinfo.split(":", 1)[1]
    return dict(urllib.parse.parse_qsl(parts.query)).get("password")


def _hide_password(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if at and ":" in userinfo:
        userinfo = userinfo.split(":", 1)[0] + ":" + _MASK
    query = urllib.parse.urlencode([(k, _MASK if k == "password" else v)
                                    for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)],
                                   safe="*")
    return urllib.parse.urlunsplit(parts._replace(netloc=userinfo + at + hostport, query=query))


def masked_url(url: str) -> str:
    """The URL to show and record: PostgreSQL's with the password as ***, SQLite's as
    sqlite:///<absolute path>. ValueError as open_store."""
    kind, target = _parse(url)
    return "sqlite://" + os.path.abspath(target) if kind == "sqlite" else _hide_password(target)


def open_store(url: str, readonly: bool = False) -> "Store":
    """The store at url; creates the table and its indexes unless readonly. ValueError for a bad URL."""
    kind, target = _parse(url)
    if kind == "sqlite":
        return _SQLiteStore(target, readonly)
    return _PostgresStore(target, readonly)


# --- the store ----------------------------------------------------------------------------

class Store:
    """One connection to the log. One thread at a time per Store: the writer owns its own, and
    every reader opens another."""

    url: str
    _placeholder = "?"

    def __init__(self, url: str, errors: Tuple[type, ...], secret: Optional[str] = None):
        self.url = masked_url(url)
        self._errors = errors
        self._secret = secret  # scrubbed from every message, should a driver's error quote it
        self._db: Any = None
        # ON CONFLICT on both: SQLite's INSERT OR IGNORE would also drop a row that breaks NOT NULL,
        # silently, where PostgreSQL refuses it.
        self._insert_sql = (f"INSERT INTO {TABLE} ({', '.join(COLUMNS)}) VALUES "
                            f"({', '.join([self._placeholder] * len(COLUMNS))}) ON CONFLICT (request_id) DO NOTHING")

    # -- what callers use --
    def insert(self, rows: Sequence[tuple]) -> int:
        """Rows in COLUMNS order, in one transaction; a request_id already stored is skipped.
        Returns how many rows were new."""
        rows = [self._storable(r) for r in rows]
        if not rows:
            return 0
        with self._failures("cannot insert rows"), self._transaction():
            cursor = self._db.cursor()
            cursor.executemany(self._insert_sql, rows)
            return cursor.rowcount

    def read(self, start: Optional[float] = None, end: Optional[float] = None, model: Optional[str] = None,
             include_shadow: bool = False) -> Iterator[Dict[str, Any]]:
        """Rows with start <= ts < end, oldest first (ties by request_id), as dicts keyed by COLUMNS;
        request and response as stored (text)."""
        where, args = self._window(start, end, model, include_shadow)
        sql = f"SELECT {', '.join(self._select_list())} FROM {TABLE} WHERE {where} ORDER BY ts, request_id"
        with self._failures("cannot read rows"):
            for row in self._stream(sql, args):
                yield dict(zip(COLUMNS, row))

    def models(self, start: Optional[float] = None, end: Optional[float] = None,
               include_shadow: bool = False) -> Dict[str, int]:
        """Rows per model in the window (the filter read() takes, without the model)."""
        where, args = self._window(start, end, None, include_shadow)
        with self._failures("cannot count rows per model"), self._transaction():
            return dict(self._db.execute(f"SELECT model, COUNT(*) FROM {TABLE} WHERE {where} GROUP BY model",
                                         args).fetchall())

    def delete(self, older_than: Optional[float] = None, keep_rows: Optional[int] = None) -> int:
        """Retention: rows with ts < older_than go, then all but the newest keep_rows (ts, then
        request_id, as read() orders them); one transaction. Returns how many rows went."""
        if keep_rows is not None and keep_rows < 0:
            raise ValueError(f"keep_rows must be >= 0, got {keep_rows}")
        p = self._placeholder
        deleted = 0
        with self._failures("cannot delete rows"), self._transaction():
            if older_than is not None:
                deleted += self._db.execute(f"DELETE FROM {TABLE} WHERE ts < {p}", (older_than,)).rowcount
            if keep_rows is not None:
                # The newest row to drop; it and everything older go (the ts index serves both statements).
                cutoff = self._db.execute(f"SELECT ts, request_id FROM {TABLE} ORDER BY ts DESC, request_id DESC "
                                          f"LIMIT 1 OFFSET {p}", (keep_rows,)).fetchone()
                if cutoff is not None:
                    deleted += self._db.execute(
                        f"DELETE FROM {TABLE} WHERE ts < {p} OR (ts = {p} AND request_id <= {p})",
                        (cutoff[0], cutoff[0], cutoff[1])).rowcount
        return deleted

    def count(self) -> int:
        with self._failures("cannot count rows"), self._transaction():
            return self._db.execute(f"SELECT COUNT(*) FROM {TABLE}").fetchone()[0]

    def close(self) -> None:
        if self._db is not None:
            with self._failures("cannot close"):
                self._db.close()
            self._db = None

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- shared machinery --
    def _window(self, start, end, model, include_shadow) -> Tuple[str, List[Any]]:
        p = self._placeholder
        where, args = ["1=1"], []
        for clause, value in ((f"ts >= {p}", start), (f"ts < {p}", end), (f"model = {p}", model)):
            if value is not None:
                where.append(clause)
                args.append(value)
        if not include_shadow:
            where.append("shadow = 0")
        return " AND ".join(where), args

    @contextlib.contextmanager
    def _failures(self, doing: str):
        try:
            yield
        except self._errors as e:
            raise StoreError(self._message(f"{doing}: {e}")) from e

    def _message(self, text: str) -> str:
        if self._secret:
            text = text.replace(self._secret, _MASK).replace(urllib.parse.unquote(self._secret), _MASK)
        return f"prediction log {self.url}: {text}"

    def _select_list(self) -> Sequence[str]:
        return COLUMNS

    def _storable(self, row: tuple) -> tuple:
        """The row as both stores keep it. PostgreSQL's TEXT cannot hold NUL, which a client's
        malformed body or URL may contain (not JSON, nor a model name, either way): it becomes
        U+FFFD in both stores, so they hold the same text. A shadow flag given as bool binds as a number."""
        if len(row) != len(COLUMNS):
            raise ValueError(f"a prediction log row has {len(COLUMNS)} values ({', '.join(COLUMNS)}), "
                             f"got {len(row)}")
        row = [v.replace("\x00", "\ufffd") if isinstance(v, str) and "\x00" in v else v for v in row]
        if isinstance(row[_SHADOW], bool):
            row[_SHADOW] = int(row[_SHADOW])
        return tuple(row)

    def _transaction(self):
        raise NotImplementedError

    def _stream(self, sql: str, args: List[Any]) -> Iterator[tuple]:
        raise NotImplementedError


class _SQLiteStore(Store):
    _SCHEMA = f"""
        CREATE TABLE IF NOT EXISTS {TABLE} (
            request_id TEXT PRIMARY KEY,
            client_request_id TEXT,
            ts REAL NOT NULL,
            model TEXT NOT NULL,
            variant TEXT NOT NULL,
            model_version INTEGER,
            shadow INTEGER NOT NULL DEFAULT 0,
            api TEXT NOT NULL,
            status INTEGER NOT NULL,
            latency_ms REAL NOT NULL,
            routing_key TEXT,
            request TEXT NOT NULL,
            response TEXT NOT NULL,
            policy TEXT,
            propensity REAL
        )"""
    _INDEXES = (f"CREATE INDEX IF NOT EXISTS {TABLE}_ts ON {TABLE} (ts)",
                f"CREATE INDEX IF NOT EXISTS {TABLE}_client_request_id ON {TABLE} (client_request_id)")

    # Columns added after logs were first written: an older table gets them when opened for writing,
    # and reads them as NULL when opened read-only.
    _ADDED_COLUMNS = {"client_request_id": "TEXT", "policy": "TEXT", "propensity": "REAL"}

    def __init__(self, path: str, readonly: bool):
        super().__init__("sqlite://" + os.path.abspath(path), (sqlite3.Error, OSError))
        if readonly and not os.path.isfile(path):
            raise StoreError(self._message("no such file"))
        with self._failures("cannot open it"):
            if readonly:
                self._db = sqlite3.connect(f"file:{urllib.parse.quote(os.path.abspath(path))}?mode=ro", uri=True,
                                           timeout=SQLITE_TIMEOUT_SECONDS, check_same_thread=False)
            else:
                self._db = sqlite3.connect(path, timeout=SQLITE_TIMEOUT_SECONDS, check_same_thread=False)
        try:
            self._present = self._prepare(readonly)
        except BaseException:
            self.close()
            raise

    def _prepare(self, readonly: bool) -> List[str]:
        """Creates or completes the table (not readonly); the columns it has."""
        with self._failures("cannot open it"):
            if not readonly:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a process crash loses no commit
                with self._db:
                    self._db.execute(self._SCHEMA)
                    for column, kind in self._ADDED_COLUMNS.items():
                        if column not in self._columns():
                            self._db.execute(f"ALTER TABLE {TABLE} ADD COLUMN {column} {kind}")
                    for index in self._INDEXES:
                        self._db.execute(index)
            present = self._columns()
        missing = [c for c in COLUMNS if c not in present and c not in self._ADDED_COLUMNS]
        if missing:
            raise StoreError(self._message(f"no {TABLE} table: not a prediction log" if not present else
                                           f"the {TABLE} table lacks {', '.join(missing)}: not a prediction log"))
        return present

    def _columns(self) -> List[str]:
        return [row[1] for row in self._db.execute(f"PRAGMA table_info({TABLE})")]

    def _select_list(self) -> Sequence[str]:
        return [c if c in self._present else f"NULL AS {c}" for c in COLUMNS]

    def _transaction(self):
        return self._db

    def _stream(self, sql: str, args: List[Any]) -> Iterator[tuple]:
        return self._db.execute(sql, args)


class _PostgresStore(Store):
    _placeholder = "%s"
    # COLLATE "C": request ids order byte by byte, as in SQLite, whatever the database's locale.
    _SCHEMA = (f"""
        CREATE TABLE IF NOT EXISTS {TABLE} (
            request_id TEXT COLLATE "C" PRIMARY KEY,
            client_request_id TEXT,
            ts DOUBLE PRECISION NOT NULL,
            model TEXT NOT NULL,
            variant TEXT NOT NULL,
            model_version BIGINT,
            shadow SMALLINT NOT NULL DEFAULT 0,
            api TEXT NOT NULL,
            status INTEGER NOT NULL,
            latency_ms DOUBLE PRECISION NOT NULL,
            routing_key TEXT,
            request TEXT NOT NULL,
            response TEXT NOT NULL,
            policy TEXT,
            propensity DOUBLE PRECISION
        )""", f"CREATE INDEX IF NOT EXISTS {TABLE}_ts ON {TABLE} (ts)",
        f"CREATE INDEX IF NOT EXISTS {TABLE}_client_request_id ON {TABLE} (client_request_id)",
        # Columns added after logs were first written: an older table gets them.
        f"ALTER TABLE {TABLE} ADD COLUMN IF NOT EXISTS policy TEXT",
        f"ALTER TABLE {TABLE} ADD COLUMN IF NOT EXISTS propensity DOUBLE PRECISION")
    # Replicas starting together would race on CREATE TABLE IF NOT EXISTS; this lock serialises them.
    _SCHEMA_LOCK = 0x736B65776C657373  # "skewless"
    _READ_BATCH = 2000

    def __init__(self, url: str, readonly: bool):
        try:
            import psycopg
        except ImportError as e:
            raise StoreError(f"prediction log {_hide_password(url)}: PostgreSQL needs psycopg "
                             "(pip install 'psycopg[binary]', pinned in requirements/lock.txt)") from e
        super().__init__(url, (psycopg.Error, OSError), secret=_password(url))
        self._cursors = 0
        options = {} if "connect_timeout" in url else {"connect_timeout": SQLITE_TIMEOUT_SECONDS}
        with self._failures("cannot connect"):
            self._db = psycopg.connect(url, autocommit=True, application_name="skewless", **options)
        try:
            exists = self._prepare(readonly)
        except BaseException:
            self.close()
            raise
        if not exists:
            self.close()
            raise StoreError(self._message(f"no {TABLE} table: nothing has written to this log yet"))

    def _prepare(self, readonly: bool) -> bool:
        """Creates the table and indexes (not readonly); whether the table exists."""
        with self._failures("cannot create the table" if not readonly else "cannot open it"):
            if readonly:
                self._db.read_only = True
                with self._db.transaction():
                    return self._db.execute("SELECT to_regclass(%s)", (TABLE,)).fetchone()[0] is not None
            with self._db.transaction():
                self._db.execute("SELECT pg_advisory_xact_lock(%s)", (self._SCHEMA_LOCK,))
                for statement in self._SCHEMA:
                    self._db.execute(statement)
            return True

    def _transaction(self):
        return self._db.transaction()

    def _stream(self, sql: str, args: List[Any]) -> Iterator[tuple]:
        # A server-side cursor: a month of log is streamed, not loaded.
        self._cursors += 1
        with self._db.transaction(), self._db.cursor(name=f"read_{self._cursors}") as cursor:
            cursor.itersize = self._READ_BATCH
            cursor.execute(sql, args)
            yield from cursor


# --- reading for the jobs -----------------------------------------------------------------

def decode(record: Dict[str, Any]) -> Dict[str, Any]:
    """The record with request and response decoded from JSON; a body that is not JSON (a client's
    malformed request, logged as sent) becomes None."""
    return {**record, "request": _json(record["request"]), "response": _json(record["response"])}


def _json(text: Optional[str]) -> Any:
    try:
        return json.loads(text) if text is not None else None
    except ValueError:
        return None


def read_records(url: str, start: Optional[float] = None, end: Optional[float] = None,
                 model: Optional[str] = None, include_shadow: bool = False) -> Iterator[Dict[str, Any]]:
    """Like Store.read on a store opened read-only, with request/response decoded (decode())."""
    with open_store(url, readonly=True) as store:
        for record in store.read(start, end, model, include_shadow):
            yield decode(record)


def instances(request: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The rows of a logged request body as feature dicts (copies), by serving/wire.py's
    feature_rows: instances, inputs columns, or :classify / :regress examples with their context."""
    return [dict(r) for r in wire.feature_rows(request)]
    if "instances" in request:
        return [dict(r) for r in request["instances"] if isinstance(r, dict)]
    inputs = request.get("inputs")
    if isinstance(inputs, dict) and inputs:
        n = max(len(v) if isinstance(v, list) else 1 for v in inputs.values())
        return [{k: (v[i] if isinstance(v, list) else v) for k, v in inputs.items()
                 if not isinstance(v, list) or i < len(v)} for i in range(n)]
    if "examples" in request:  # :classify / :regress
        context = request.get("context", {})
        return [{**context, **e} for e in request["examples"] if isinstance(e, dict)]
    return []
