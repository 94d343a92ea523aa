-- Per-stream commit order, and checkpoints that only move forward.
--
-- Subscribers read in (tx_id, position) order, but a transaction gets its id at its first write, not at its
-- commit. An append that had its id (from a first stream of its batch, from its checkpoint, or from an UPDATE that
-- takes one before it waits for a row lock) could wait for a stream held by a younger transaction, which wrote v1
-- and committed; the older transaction then wrote v2, and subscribers saw v2 before v1. Now every append first
-- takes a transaction-level advisory lock on each of its streams, in one fixed order (by lock key, so two batches
-- cannot deadlock), before it writes anything. An advisory lock assigns no transaction id, so of two transactions
-- that write one stream the second waits without an id until the first has committed, and gets a younger id than
-- the first: per stream, commit order is version order. The checkpoint is written after the stream.
-- Left out: an append inside a caller's transaction that has already written something (its id is already
-- assigned); such a caller takes the locks first with agenthub_lock_streams (EventLog.lock_streams).
--
-- A checkpoint write that would move a subscriber's cursor backwards (a flush that captured an older cursor
-- than the one the subscriber wrote in its own transaction) leaves the newer one in place.

-- A stream's lock is (16712, hashtext(stream)): 16712 is 'AH', and the two-key form shares no key with the
-- migrator's one-key lock. Two streams with one hash share a lock, which only makes their appends wait for each
-- other. The locks are taken in key order by one statement (the sorted subquery feeds the calls in its order; a
-- PL/pgSQL loop of one PERFORM per stream measured 50 against 21 us for 16 streams).
CREATE FUNCTION agenthub_lock_streams(p_streams text[]) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(16712, k)
    FROM (SELECT DISTINCT hashtext(s) AS k FROM unnest(p_streams) AS s ORDER BY 1) AS sorted;
END $$;

CREATE FUNCTION agenthub_save_checkpoint(p_subscriber text, p_tx xid8, p_position bigint) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO checkpoints AS c (subscriber, tx_id, position) VALUES (p_subscriber, p_tx, p_position)
    ON CONFLICT (subscriber) DO UPDATE SET tx_id = EXCLUDED.tx_id, position = EXCLUDED.position, updated_at = now()
    WHERE (c.tx_id, c.position) < (EXCLUDED.tx_id, EXCLUDED.position);
$$;

CREATE OR REPLACE FUNCTION agenthub_append(
    p_stream text, p_mode text, p_expected bigint,
    p_ids uuid[], p_types text[], p_data jsonb[], p_meta jsonb[],
    p_idem_key text,
    p_cp_subscriber text, p_cp_tx xid8, p_cp_position bigint,
    p_notify boolean
) RETURNS TABLE (out_position bigint, out_version bigint, out_replayed boolean)
LANGUAGE plpgsql AS $$
DECLARE
    n       bigint := cardinality(p_ids);
    v_new   bigint;
    v_found bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(16712, hashtext(p_stream));  -- before any write: see the top of this file
    IF p_idem_key IS NOT NULL THEN
        RETURN QUERY SELECT e.position, e.version, true FROM events e
            WHERE e.idem_key = p_idem_key ORDER BY e.idem_seq;
        IF FOUND THEN
            IF p_cp_subscriber IS NOT NULL THEN
                PERFORM agenthub_save_checkpoint(p_cp_subscriber, p_cp_tx, p_cp_position);
            END IF;
            RETURN;
        END IF;
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
    IF p_notify THEN
        PERFORM pg_notify('agenthub_events', '');
    END IF;
    RETURN QUERY
        INSERT INTO events (id, stream, version, type, data, meta, idem_key, idem_seq)
        SELECT u.id, p_stream, v_new - n + u.ord, u.type, u.data, u.meta, p_idem_key,
               CASE WHEN p_idem_key IS NULL THEN NULL ELSE u.ord END
        FROM unnest(p_ids, p_types, p_data, p_meta) WITH ORDINALITY AS u(id, type, data, meta, ord)
        RETURNING events.position, events.version, false;
    IF p_cp_subscriber IS NOT NULL THEN
        PERFORM agenthub_save_checkpoint(p_cp_subscriber, p_cp_tx, p_cp_position);
    END IF;
END $$;

CREATE OR REPLACE FUNCTION agenthub_append_batch(
    p_streams text[], p_modes text[], p_expected bigint[], p_idem_keys text[],
    p_offsets int[], p_counts int[],
    p_ids uuid[], p_types text[], p_data jsonb[], p_meta jsonb[]
) RETURNS TABLE (out_item int, out_position bigint, out_version bigint, out_replayed boolean, out_actual bigint)
LANGUAGE plpgsql AS $$
DECLARE
    i       int;
    n       bigint;
    lo      int;
    hi      int;
    v_mode  text;
    v_new   bigint;
    v_found bigint;
BEGIN
    -- every stream of the batch, before its first write (as agenthub_lock_streams, inline)
    PERFORM pg_advisory_xact_lock(16712, k)
    FROM (SELECT DISTINCT hashtext(s) AS k FROM unnest(p_streams) AS s ORDER BY 1) AS sorted;
    FOR i IN SELECT s.ord FROM unnest(p_streams) WITH ORDINALITY AS s(stream, ord) ORDER BY s.stream, s.ord LOOP
        IF p_idem_keys[i] IS NOT NULL THEN
            RETURN QUERY SELECT i, e.position, e.version, true, NULL::bigint FROM events e
                WHERE e.idem_key = p_idem_keys[i] ORDER BY e.idem_seq;
            IF FOUND THEN CONTINUE; END IF;
        END IF;
        n := p_counts[i];
        v_mode := p_modes[i];
        IF v_mode = 'exact' AND p_expected[i] = 0 THEN
            v_mode := 'no_stream';
        END IF;
        v_new := NULL;
        IF v_mode = 'any' THEN
            INSERT INTO streams AS s (stream, version) VALUES (p_streams[i], n)
            ON CONFLICT (stream) DO UPDATE SET version = s.version + n
            RETURNING s.version INTO v_new;
        ELSIF v_mode = 'no_stream' THEN
            INSERT INTO streams AS s (stream, version) VALUES (p_streams[i], n)
            ON CONFLICT (stream) DO NOTHING
            RETURNING s.version INTO v_new;
        ELSE
            UPDATE streams s SET version = s.version + n
            WHERE s.stream = p_streams[i] AND s.version = p_expected[i]
            RETURNING s.version INTO v_new;
        END IF;
        IF v_new IS NULL THEN
            SELECT s.version INTO v_found FROM streams s WHERE s.stream = p_streams[i];
            RETURN QUERY SELECT i, NULL::bigint, NULL::bigint, false, coalesce(v_found, 0);
            CONTINUE;
        END IF;
        lo := p_offsets[i];
        hi := lo + n - 1;
        RETURN QUERY
            INSERT INTO events (id, stream, version, type, data, meta, idem_key, idem_seq)
            SELECT u.id, p_streams[i], v_new - n + u.ord, u.type, u.data, u.meta, p_idem_keys[i],
                   CASE WHEN p_idem_keys[i] IS NULL THEN NULL ELSE u.ord END
            FROM unnest(p_ids[lo:hi], p_types[lo:hi], p_data[lo:hi], p_meta[lo:hi])
                 WITH ORDINALITY AS u(id, type, data, meta, ord)
            RETURNING i, events.position, events.version, false, NULL::bigint;
    END LOOP;
END $$;
