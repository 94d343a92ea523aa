-- The event log. Positions are global; versions are per stream.
-- tx_id records the writing transaction so subscribers can read in commit order (trap 1, see eventlog.py).
CREATE TABLE streams (
    stream  text PRIMARY KEY,
    version bigint NOT NULL
);

CREATE TABLE events (
    position    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tx_id       xid8 NOT NULL DEFAULT pg_current_xact_id(),
    id          uuid NOT NULL,
    stream      text NOT NULL,
    version     bigint NOT NULL,
    type        text NOT NULL,
    data        jsonb NOT NULL,
    meta        jsonb NOT NULL,
    idem_key    text,
    idem_seq    int,
    recorded_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    CONSTRAINT events_stream_version UNIQUE (stream, version),
    CONSTRAINT events_id UNIQUE (id)
);
CREATE UNIQUE INDEX events_idem ON events (idem_key, idem_seq) WHERE idem_key IS NOT NULL;
CREATE INDEX events_commit_order ON events (tx_id, position);
CREATE INDEX events_type ON events (type, position);

CREATE TABLE snapshots (
    stream     text PRIMARY KEY,
    version    bigint NOT NULL,
    state      jsonb NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- A subscriber's cursor, written in the same transaction as the work it records.
CREATE TABLE checkpoints (
    subscriber text PRIMARY KEY,
    tx_id      xid8 NOT NULL,
    position   bigint NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Secrets are never in events: events carry a reference into this table.
CREATE TABLE secrets (
    ref        text PRIMARY KEY,
    value      text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- One round trip per append: optimistic concurrency on streams.version (row lock, checked by the database),
-- idempotency by key, one NOTIFY per transaction, and an optional checkpoint in the same transaction.
CREATE FUNCTION agenthub_append(
    p_stream text, p_mode text, p_expected bigint,
    p_ids uuid[], p_types text[], p_data jsonb[], p_meta jsonb[],
    p_idem_key text,
    p_cp_subscriber text, p_cp_tx xid8, p_cp_position bigint
) RETURNS TABLE (out_position bigint, out_version bigint, out_replayed boolean)
LANGUAGE plpgsql AS $$
DECLARE
    n       bigint := cardinality(p_ids);
    v_new   bigint;
    v_found bigint;
BEGIN
    IF p_cp_subscriber IS NOT NULL THEN
        INSERT INTO checkpoints AS c (subscriber, tx_id, position) VALUES (p_cp_subscriber, p_cp_tx, p_cp_position)
        ON CONFLICT (subscriber) DO UPDATE SET tx_id = EXCLUDED.tx_id, position = EXCLUDED.position, updated_at = now();
    END IF;
    IF p_idem_key IS NOT NULL THEN
        RETURN QUERY SELECT e.position, e.version, true FROM events e
            WHERE e.idem_key = p_idem_key ORDER BY e.idem_seq;
        IF FOUND THEN RETURN; END IF;
    END IF;
    IF p_mode = 'exact' AND p_expected = 0 THEN
        p_mode := 'no_stream';
    END IF;
    IF p_mode = 'any' THEN
        INSERT INTO streams AS s (stream, version) VALUES (p_stream, n)
        ON CONFLICT (stream) DO UPDATE SET version = s.version + n
        RETURNING s.version INTO v_new;
    ELSIF p_mode = 'no_stream' THEN
        INSERT INTO streams AS s (stream, version) VALUES (p_stream, n)
        ON CONFLICT (stream) DO NOTHING
        RETURNING s.version INTO v_new;
    ELSE
        UPDATE streams s SET version = s.version + n
        WHERE s.stream = p_stream AND s.version = p_expected
        RETURNING s.version INTO v_new;
    END IF;
    IF v_new IS NULL THEN
        SELECT s.version INTO v_found FROM streams s WHERE s.stream = p_stream;
        RAISE EXCEPTION 'wrong expected version for %: expected %, actual %',
            p_stream, CASE WHEN p_mode = 'no_stream' THEN 'no stream' ELSE p_expected::text END,
            coalesce(v_found, 0)
            USING ERRCODE = 'AH409', DETAIL = coalesce(v_found, 0)::text;
    END IF;
    PERFORM pg_notify('agenthub_events', '');
    RETURN QUERY
        INSERT INTO events (id, stream, version, type, data, meta, idem_key, idem_seq)
        SELECT u.id, p_stream, v_new - n + u.ord, u.type, u.data, u.meta, p_idem_key,
               CASE WHEN p_idem_key IS NULL THEN NULL ELSE u.ord END
        FROM unnest(p_ids, p_types, p_data, p_meta) WITH ORDINALITY AS u(id, type, data, meta, ord)
        RETURNING events.position, events.version, false;
END $$;
