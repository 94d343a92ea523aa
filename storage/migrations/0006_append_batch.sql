-- Group commit: the appends a process makes concurrently go to Postgres as one call and one transaction
-- (storage/group_commit.py). Each append keeps its own outcome: a wrong expected version is returned for that
-- append (out_actual) instead of raised, so it aborts nothing else. Streams are locked in name order, so two
-- batches cannot deadlock on each other; appends to one stream keep their order within the batch.
-- Events arrive flattened: append i owns p_counts[i] events from p_offsets[i] (1-based).
CREATE FUNCTION agenthub_append_batch(
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
