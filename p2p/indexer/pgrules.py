"""The indexer's rules as PostgreSQL functions: one statement runs a whole batch.

``p2p_batch(requests jsonb, lease)`` applies each request of a batch (a JSON
object per request, built by :meth:`p2p.indexer.pgdirectory.ClusterDirectory.request`)
in the order given, then writes their audit records into the outbox, numbered
last (so in commit order), all as one statement: its own transaction. It returns
one JSON object per request: its code, and what the node needs besides (the
listing's rows, the address to probe first, whether the user's lease ended or
renews). For SEARCH it only checks: the node ranks the hits (Python: the folding
and BM25 of :mod:`p2p.indexer.fulltext`).

Why in the server: a node's Python time per request is what limits it (its
reactor and its database thread share one interpreter lock), and psycopg
spends 11-16 µs of it per statement; here a batch of any size is one statement.

Every code comes from the request (``wire.OpSpec``: ``error``, and ``no_user``,
``not_connected``, ``own`` when the operation has them), and the checks run in
the order of the codes, as in :mod:`p2p.indexer.directory`: the claim (and the
``--classic`` policy, decided by the node as ``allowed``), then user exists,
then connected, then the operation's own check.

A crowd asking for one long listing (``LIST_CONTENT`` of a popular owner) often
lands in one batch: each repeat of a listing of 64 rows or more, equal to the
last one of its kind (operation and owner) in the batch, comes back as
``{"same": <position of that result>}`` instead of its rows, so the
result holds it once (100 readers of a 4 MB listing used to fetch and parse
hundreds of MB); :func:`resolve_same` gives the repeats that one's rows. Only a
request that says it reads ``same`` (``share``) is answered so: every node
recreates these rules at its start, and a node of an older version, which has no
:func:`resolve_same`, runs them during a rolling upgrade and must get rows.
Across batches, a long owner listing comes with the state of the owner's files it
shows (``digest``: see ``p2p_owner_listing``), and a node that holds that one
(:class:`Listings`) gets the state alone while the files are unchanged, which the
server tells without building the listing.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any


def resolve_same(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A batch's results with each ``same`` reference given the rows it names (the one
    list object: its listing is then encoded once, see ``ClusterFactory.shared``)."""
    for result in results:
        if "same" in result:
            first = results[result.pop("same")]
            result["rows"] = first["rows"]
            result["listing"] = first.setdefault("listing", [])
    return results


class Request(dict):
    """A request as ``p2p_request`` reads it (the dict, sent as JSON) and, not sent, the
    long listing the node holds for it (:class:`Listings`): ``(digest, body)`` or None."""

    __slots__ = ("held",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.held: tuple[str, bytes] | None = None


class Listings:
    """The long owner listings (``LIST_CONTENT``, ``LIST_FILES`` of 64 rows or more)
    this node sent last, by operation and owner, with the digest the server gave.

    A request names the digest of the one held (``have``); while the owner's files are
    unchanged the server answers with the digest alone, and the node sends the bytes
    it holds: a crowd asking for one long listing costs the node one parse and one
    copy, not one per batch (and the replies share it, see ``ClusterFactory.shared``).
    """

    def __init__(self, kept: int = 8) -> None:
        self.kept = kept
        self._held: OrderedDict[tuple[str, str], tuple[str, bytes]] = OrderedDict()

    def ask(self, request: Request) -> None:
        """Name in ``request`` the listing held for its operation and owner, if any."""
        held = self._held.get((request["op"], request["owner"]))
        request.held = held
        if held is not None:
            request["have"] = held[0]

    def body(self, request: Request, result: dict[str, Any]) -> bytes:
        """The wire listing of ``result``: its rows encoded (and held, when it has a
        digest), or the bytes held for ``request`` when the server said they still are."""
        if "rows" not in result:
            if request.held is None or request.held[0] != result["digest"]:
                raise ValueError("the server named a listing this node does not hold")
            return request.held[1]
        body = listing_of(result)
        if "digest" in result:
            key = (request["op"], request["owner"])
            self._held[key] = (result["digest"], body)
            self._held.move_to_end(key)
            while len(self._held) > self.kept:
                self._held.popitem(last=False)
        return body


def listing_of(result: dict[str, Any]) -> bytes:
    """The wire listing of a result's rows: encoded once for the results that share
    them (:func:`resolve_same`)."""
    from p2p import wire

    shared = result.get("listing")
    if shared is None:
        return wire.encode_listing(result["rows"])
    if not shared:
        shared.append(wire.encode_listing(result["rows"]))
    return shared[0]


def decode_batch(data: bytes | str) -> list[dict[str, Any]]:
    """A batch's results from the JSON text ``p2p_batch`` returned."""
    import json

    return resolve_same(json.loads(data))


RULES = r"""
CREATE OR REPLACE FUNCTION p2p_request(r jsonb, lease double precision) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    usr text := r->>'user';
    ident text := r->>'identity';
    op text := r->>'op';
    u_ip text;
    u_port integer;
    u_identity text;
    u_connected bigint;
    known boolean;
    listing jsonb;
    res jsonb;
BEGIN
    SELECT ip, port, identity, connected INTO u_ip, u_port, u_identity, u_connected
        FROM users WHERE name = usr FOR UPDATE;
    known := FOUND;
    IF NOT (r->>'allowed')::boolean
            OR (known AND u_identity IS NOT NULL AND u_identity IS DISTINCT FROM ident) THEN
        RETURN jsonb_build_object('code', r->'error');
    END IF;
    IF NOT known AND r ? 'no_user' THEN
        RETURN jsonb_build_object('code', r->'no_user');
    END IF;
    IF r ? 'not_connected' AND u_ip IS NULL THEN
        RETURN jsonb_build_object('code', r->'not_connected');
    END IF;
    CASE op
    WHEN 'REGISTER' THEN
        IF known THEN
            res := jsonb_build_object('code', r->'own');
        ELSE
            INSERT INTO users (name, identity) VALUES (usr, ident) ON CONFLICT DO NOTHING;
            IF FOUND THEN
                res := jsonb_build_object('code', 0);
            ELSE
                -- Registered by another request (on any node) since we looked.
                SELECT identity INTO u_identity FROM users WHERE name = usr;
                IF u_identity IS NOT NULL AND u_identity IS DISTINCT FROM ident THEN
                    res := jsonb_build_object('code', r->'error');
                ELSE
                    res := jsonb_build_object('code', r->'own');
                END IF;
            END IF;
        END IF;
    WHEN 'UNREGISTER' THEN
        IF u_ip IS NOT NULL THEN  -- refused while connected
            res := jsonb_build_object('code', r->'error');
        ELSE
            DELETE FROM users WHERE name = usr;  -- its files go with it
            res := jsonb_build_object('code', 0);
        END IF;
    WHEN 'CONNECT' THEN
        IF u_ip IS NOT NULL AND ((r->>'stale_ip') IS NULL OR u_ip <> r->>'stale_ip'
                OR u_port <> (r->>'stale_port')::integer) THEN
            IF (r->>'probe')::boolean THEN
                -- Nothing written: the node probes this address, then asks again.
                RETURN jsonb_build_object('probe', jsonb_build_array(u_ip, u_port));
            END IF;
            res := jsonb_build_object('code', r->'own');
        ELSIF (r->>'ip') IS NULL THEN
            res := jsonb_build_object('code', r->'error');
        ELSE
            UPDATE users SET ip = r->>'ip', port = (r->>'port')::integer,
                connected = nextval('connect_order'),
                lease_until = extract(epoch from now()) + lease, lease_kind = 0
                WHERE name = usr;
            res := jsonb_build_object('code', 0, 'ended', u_ip IS NOT NULL);
        END IF;
    WHEN 'DISCONNECT' THEN
        UPDATE users SET ip = NULL, port = NULL, connected = NULL, lease_until = NULL
            WHERE name = usr;
        res := jsonb_build_object('code', 0, 'ended', true);
    WHEN 'ALIVE', 'HOLD' THEN
        UPDATE users SET lease_until = extract(epoch from now()) + lease,
            lease_kind = CASE WHEN lease_kind = 2 THEN 2 ELSE 1 END
            WHERE name = usr;
        res := jsonb_build_object('code', 0, 'connected', u_connected);
    WHEN 'PUBLISH', 'PUBLISH_FILE' THEN
        IF r->>'mode' = 'replace' THEN
            INSERT INTO files (owner, name, description, size, sha256, words)
                VALUES (usr, r->>'file', r->>'description', (r->>'size')::bigint,
                        r->>'sha256',
                        array_to_tsvector(ARRAY(SELECT jsonb_array_elements_text(r->'words'))))
                ON CONFLICT (owner, name) DO UPDATE SET description = excluded.description,
                    size = excluded.size, sha256 = excluded.sha256, words = excluded.words;
            res := jsonb_build_object('code', 0);
        ELSE
            INSERT INTO files (owner, name, description, size, sha256, words)
                VALUES (usr, r->>'file', r->>'description', (r->>'size')::bigint,
                        r->>'sha256',
                        array_to_tsvector(ARRAY(SELECT jsonb_array_elements_text(r->'words'))))
                ON CONFLICT (owner, name) DO NOTHING;
            res := jsonb_build_object('code', CASE WHEN FOUND THEN to_jsonb(0) ELSE r->'own' END);
        END IF;
    WHEN 'DELETE' THEN
        DELETE FROM files WHERE owner = usr AND name = r->>'file';
        res := jsonb_build_object('code', CASE WHEN FOUND THEN to_jsonb(0) ELSE r->'own' END);
    WHEN 'LIST_USERS' THEN
        SELECT coalesce(jsonb_agg(jsonb_build_array(name, ip, port) ORDER BY connected), '[]')
            INTO listing FROM users WHERE ip IS NOT NULL;
        res := jsonb_build_object('code', 0, 'rows', listing);
    WHEN 'LIST_PEERS' THEN
        SELECT coalesce(jsonb_agg(jsonb_build_array(name, ip, port,
                coalesce(identity, r->>'unclaimed')) ORDER BY connected), '[]')
            INTO listing FROM users WHERE ip IS NOT NULL;
        res := jsonb_build_object('code', 0, 'rows', listing);
    WHEN 'LIST_CONTENT', 'LIST_FILES' THEN
        res := p2p_owner_listing(r);
    WHEN 'SOURCES' THEN
        SELECT coalesce(jsonb_agg(jsonb_build_array(owner, name, ip, port)
                ORDER BY owner COLLATE "C", name COLLATE "C"), '[]')
            INTO listing FROM (
                SELECT f.owner, f.name, u.ip, u.port FROM files f
                JOIN users u ON u.name = f.owner
                WHERE f.sha256 = r->>'sha256' AND u.ip IS NOT NULL AND f.owner <> usr
                ORDER BY f.owner COLLATE "C", f.name COLLATE "C" LIMIT (r->>'max')::integer
            ) found;
        res := jsonb_build_object('code', 0, 'rows', listing);
    WHEN 'SEARCH' THEN
        res := jsonb_build_object('code', 0, 'search', true);  -- ranked by the node
    END CASE;
    -- A connected user's request that passed the checks renews its lease (the node
    -- writes those in one statement a tick).
    RETURN res || jsonb_build_object(
        'seen', u_ip IS NOT NULL AND NOT coalesce((res->>'ended')::boolean, false));
END $$;

DROP FUNCTION IF EXISTS p2p_owner_listing(jsonb, jsonb);

-- The state of who's files that a long listing goes with ("digest"): their count,
-- highest and summed ids, and summed xmin (a row's transaction: every insert brings a
-- higher id, every delete a lower count, every update a newer xmin). STABLE: called
-- within a query, it reads that query's snapshot, so it describes the rows the query
-- lists.
CREATE OR REPLACE FUNCTION p2p_owner_state(who text) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT concat_ws(' ', count(*), max(id), sum(id), sum(xmin::text::bigint))
    FROM files WHERE owner = who
$$;

-- LIST_CONTENT and LIST_FILES of r->>'owner'. A long listing (64 rows or more) goes with
-- the state of the owner's files it shows (p2p_owner_state, read in the listing's own
-- query). A node holding the listing of that state (r->>'have') gets the state alone:
-- computed without building the listing.
CREATE OR REPLACE FUNCTION p2p_owner_listing(r jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    who text := r->>'owner';
    listing jsonb;
    state text;
BEGIN
    IF r ? 'have' THEN
        state := p2p_owner_state(who);
        IF state = r->>'have' THEN
            RETURN jsonb_build_object('code', 0, 'digest', state);
        END IF;
    END IF;
    -- The state in the listing's query (one snapshot), for a long listing only.
    SELECT listed_rows,
            CASE WHEN jsonb_array_length(listed_rows) >= 64 THEN p2p_owner_state(who) END
        INTO listing, state FROM (
            SELECT coalesce(jsonb_agg(CASE WHEN r->>'op' = 'LIST_CONTENT'
                    THEN jsonb_build_array(name, description)
                    ELSE jsonb_build_array(name, description, coalesce(size::text,
                        r->>'unknown'), coalesce(sha256, r->>'unknown')) END
                ORDER BY id), '[]') AS listed_rows
            FROM files WHERE owner = who) listed;
    IF listing = '[]' AND NOT EXISTS (SELECT 1 FROM users WHERE name = who) THEN
        RETURN jsonb_build_object('code', r->'own');  -- no such owner
    END IF;
    IF jsonb_array_length(listing) >= 64 THEN
        RETURN jsonb_build_object('code', 0, 'rows', listing, 'digest', state);
    END IF;
    RETURN jsonb_build_object('code', 0, 'rows', listing);
END $$;

CREATE OR REPLACE FUNCTION p2p_batch(requests jsonb, lease double precision) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    results jsonb[] := '{}';
    records text[] := '{}';
    r jsonb;
    res jsonb;
    last bigint;
    listings jsonb := '{}';  -- a long listing's key: the position of its first result
    key text;
    first integer;
BEGIN
    FOR r IN SELECT value FROM jsonb_array_elements(requests) LOOP
        res := p2p_request(r, lease);
        IF r ? 'share' AND res ? 'rows' AND jsonb_array_length(res->'rows') >= 64 THEN
            -- The same long listing again in this batch: sent once (see resolve_same),
            -- to a node that says it reads that ('share'; a node of a version before
            -- it, running these rules during a rolling upgrade, gets the rows).
            key := (r->>'op') || ' ' || coalesce(r->>'owner', '');
            first := (listings->>key)::integer;
            IF first IS NOT NULL AND results[first + 1]->'rows' = res->'rows' THEN
                res := (res - 'rows') || jsonb_build_object('same', first);
            ELSE
                listings := listings || jsonb_build_object(key, cardinality(results));
            END IF;
        END IF;
        results := results || res;
        IF r ? 'record' AND NOT res ? 'probe' THEN  -- a CONNECT to probe: audited after
            records := records || (r->>'record');
        END IF;
    END LOOP;
    IF cardinality(records) > 0 THEN
        -- Numbered last, from the counter row, whose lock is held until this statement
        -- commits: the numbers follow the commits.
        UPDATE outbox_counter SET seq = seq + cardinality(records) WHERE id = 1
            RETURNING seq INTO last;
        INSERT INTO outbox (seq, record)
            SELECT last - cardinality(records) + n, rec
            FROM unnest(records) WITH ORDINALITY AS x(rec, n);
    END IF;
    RETURN to_jsonb(results);
END $$;
"""
